//! Groups: membership, fan-out, expiry, scale.

use std::time::Duration;

use chanlayer_core::{Codec, LayerOptions};

use crate::{assert_quiet, caps, let_time_pass, recv, seq_msg, seq_of, Ctx};

/// Add 3, discard 1: the 2 get the group message, the discarded one does not.
pub async fn group_discard_excludes(ctx: Ctx) {
    let l = ctx.layer().await;
    let group = ctx.name("room");
    let mut members = Vec::new();
    for _ in 0..3 {
        let ch = l.new_channel("m").await.expect("new_channel");
        l.group_add(&group, &ch).await.expect("group_add");
        members.push(ch);
    }
    l.group_discard(&group, &members[2])
        .await
        .expect("group_discard");
    l.group_send(&group, seq_msg(1, Codec::Bincode))
        .await
        .expect("group_send");
    assert_eq!(seq_of(&recv(&l, &members[0]).await), 1);
    assert_eq!(seq_of(&recv(&l, &members[1]).await), 1);
    assert_quiet(&l, &members[2]).await;
}

/// `group_add` twice gives one copy, not two.
pub async fn group_add_twice_one_copy(ctx: Ctx) {
    let l = ctx.layer().await;
    let group = ctx.name("room");
    let ch = l.new_channel("m").await.expect("new_channel");
    let normal = ctx.name("normal-member");
    for c in [&ch, &normal] {
        l.group_add(&group, c).await.expect("group_add");
        l.group_add(&group, c).await.expect("group_add again");
    }
    l.group_send(&group, seq_msg(1, Codec::Bincode))
        .await
        .expect("group_send");
    for c in [&ch, &normal] {
        assert_eq!(seq_of(&recv(&l, c).await), 1);
        assert_quiet(&l, c).await;
    }
}

/// Discarding a non-member and sending to an empty group are both `Ok`.
pub async fn group_discard_absent_and_empty_send_ok(ctx: Ctx) {
    let l = ctx.layer().await;
    let group = ctx.name("empty");
    let ch = l.new_channel("m").await.expect("new_channel");
    l.group_discard(&group, &ch)
        .await
        .expect("discard from a group that never existed");
    l.group_send(&group, seq_msg(1, Codec::Bincode))
        .await
        .expect("send to an empty group");
    l.group_add(&group, &ch).await.expect("group_add");
    l.group_discard(&group, &ch).await.expect("discard");
    l.group_discard(&group, &ch).await.expect("discard again");
    l.group_send(&group, seq_msg(2, Codec::Bincode))
        .await
        .expect("send to an emptied group");
    assert_quiet(&l, &ch).await;
}

/// Several members with the same prefix on one instance each get exactly one copy.
pub async fn group_same_prefix_members_one_copy_each(ctx: Ctx) {
    let l = ctx.layer().await;
    let group = ctx.name("room");
    let mut members = Vec::new();
    for _ in 0..5 {
        let ch = l.new_channel("same").await.expect("new_channel");
        l.group_add(&group, &ch).await.expect("group_add");
        members.push(ch);
    }
    for i in 0..3 {
        l.group_send(&group, seq_msg(i, Codec::Bincode))
            .await
            .expect("group_send");
    }
    for ch in &members {
        for i in 0..3 {
            assert_eq!(
                seq_of(&recv(&l, ch).await),
                i,
                "{ch} gets each message once, in order"
            );
        }
        assert_quiet(&l, ch).await;
    }
}

/// Members on two instances both get a `group_send` from a third.
pub async fn group_members_on_two_instances(ctx: Ctx) {
    let a = ctx.layer().await;
    let b = ctx.layer().await;
    let c = ctx.layer().await;
    let group = ctx.name("room");
    let ma = a.new_channel("a").await.expect("new_channel");
    let mb = b.new_channel("b").await.expect("new_channel");
    a.group_add(&group, &ma).await.expect("group_add");
    b.group_add(&group, &mb).await.expect("group_add");
    c.group_send(&group, seq_msg(9, Codec::Bincode))
        .await
        .expect("group_send");
    assert_eq!(seq_of(&recv(&a, &ma).await), 9);
    assert_eq!(seq_of(&recv(&b, &mb).await), 9);
    assert_quiet(&a, &ma).await;
    assert_quiet(&b, &mb).await;
}

/// A membership ends after `group_expiry` unless `group_add` refreshed it. (Waits for time
/// to pass on purpose: expiry is the behaviour under test.)
pub async fn group_membership_expires_and_refreshes(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            group_expiry: Duration::from_millis(1500),
            ..ctx.options()
        })
        .await;
    let group = ctx.name("room");
    let refreshed = l.new_channel("r").await.expect("new_channel");
    let stale = l.new_channel("s").await.expect("new_channel");
    l.group_add(&group, &refreshed).await.expect("group_add");
    l.group_add(&group, &stale).await.expect("group_add");
    let_time_pass(Duration::from_millis(900)).await;
    l.group_add(&group, &refreshed).await.expect("refresh");
    let_time_pass(Duration::from_millis(900)).await;
    l.group_send(&group, seq_msg(1, Codec::Bincode))
        .await
        .expect("group_send");
    assert_eq!(
        seq_of(&recv(&l, &refreshed).await),
        1,
        "the refreshed membership lives"
    );
    assert_quiet(&l, &stale).await;
}

/// The same for normal-channel members: an expired membership receives nothing, on every
/// backend (AMQP once kept the broker binding until a periodic sweep, so an expired normal
/// channel went on receiving for seconds).
pub async fn group_membership_expires_normal_channels(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            group_expiry: Duration::from_millis(1500),
            ..ctx.options()
        })
        .await;
    let group = ctx.name("room");
    let refreshed = ctx.name("nr");
    let stale = ctx.name("ns");
    l.group_add(&group, &refreshed).await.expect("group_add");
    l.group_add(&group, &stale).await.expect("group_add");
    let_time_pass(Duration::from_millis(900)).await;
    l.group_add(&group, &refreshed).await.expect("refresh");
    let_time_pass(Duration::from_millis(700)).await;
    // Just past the stale membership's expiry, and on for a while after it.
    for i in 0..4 {
        l.group_send(&group, seq_msg(i, Codec::Bincode))
            .await
            .expect("group_send");
        let_time_pass(Duration::from_millis(150)).await;
    }
    for i in 0..4 {
        assert_eq!(
            seq_of(&recv(&l, &refreshed).await),
            i,
            "the refreshed membership lives"
        );
    }
    assert_quiet(&l, &stale).await;
}

/// `group_send` to 1,000 members delivers 1,000 copies, one each.
pub async fn group_send_1000_members(ctx: Ctx) {
    let l = ctx.layer().await;
    let group = ctx.name("big");
    let mut members = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let ch = l.new_channel("m").await.expect("new_channel");
        l.group_add(&group, &ch).await.expect("group_add");
        members.push(ch);
    }
    l.group_send(&group, seq_msg(1000, Codec::Bincode))
        .await
        .expect("group_send");
    for ch in &members {
        assert_eq!(seq_of(&recv(&l, ch).await), 1000);
    }
    // One copy each: a second message is the next thing every member sees.
    l.group_send(&group, seq_msg(1001, Codec::Bincode))
        .await
        .expect("group_send");
    for ch in &members {
        assert_eq!(
            seq_of(&recv(&l, ch).await),
            1001,
            "{ch} got exactly one copy"
        );
    }
}

/// 100 concurrent `group_send`s all arrive intact at every member.
pub async fn concurrent_100_group_sends(ctx: Ctx) {
    let l = ctx
        .layer_with(LayerOptions {
            capacity: 1000,
            ..ctx.options()
        })
        .await;
    let sender = ctx.layer().await;
    let group = ctx.name("conc");
    let members: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let ch = l.new_channel("m").await.expect("new_channel");
            l.group_add(&group, &ch).await.expect("group_add");
            v.push(ch);
        }
        v
    };
    let sends = (0..100u64).map(|i| {
        let (sender, group) = (sender.clone(), group.clone());
        tokio::spawn(async move { sender.group_send(&group, seq_msg(i, Codec::Json)).await })
    });
    for s in futures::future::join_all(sends).await {
        s.expect("task").expect("group_send");
    }
    for ch in &members {
        let mut got: Vec<u64> = Vec::new();
        for _ in 0..100 {
            got.push(seq_of(&recv(&l, ch).await));
        }
        got.sort_unstable();
        assert_eq!(
            got,
            (0..100).collect::<Vec<_>>(),
            "{ch} got all 100, once each"
        );
    }
}

/// `group_members` lists the live members: every instance's where the backend claims
/// `all_group_members`, this instance's own (its process-local channels and the normal
/// channels it added) otherwise; a discarded member is gone from the list.
pub async fn group_members_lists_the_members(ctx: Ctx) {
    let a = ctx.layer().await;
    let b = ctx.layer().await;
    let group = ctx.name("members");
    let a1 = a.new_channel("m").await.expect("new_channel");
    let a2 = a.new_channel("m").await.expect("new_channel");
    let b1 = b.new_channel("m").await.expect("new_channel");
    for ch in [&a1, &a2] {
        a.group_add(&group, ch).await.expect("group_add");
    }
    b.group_add(&group, &b1).await.expect("group_add");
    let normal = ctx.name("members-normal");
    let caps = caps(&a);
    let mut own = vec![a1.clone(), a2.clone()];
    if caps.normal_channels {
        a.group_add(&group, &normal)
            .await
            .expect("group_add a normal channel");
        own.push(normal.clone());
    }
    let mut all = own.clone();
    all.push(b1.clone());
    own.sort();
    all.sort();
    let listed = a.group_members(&group).await.expect("group_members");
    if caps.all_group_members {
        assert_eq!(listed, all, "every instance's members");
    } else {
        assert_eq!(listed, own, "this instance's own members");
        assert_eq!(
            b.group_members(&group).await.expect("group_members"),
            vec![b1.clone()]
        );
    }
    a.group_discard(&group, &a1).await.expect("group_discard");
    let listed = a.group_members(&group).await.expect("group_members");
    assert!(!listed.contains(&a1), "{listed:?}");
    assert!(listed.contains(&a2), "{listed:?}");
    assert!(
        a.group_members("bad!group").await.is_err(),
        "an invalid group name is an error"
    );
}

/// [`inspect`](chanlayer_core::inspect) from a fourth instance: the instances of the
/// deployment (this test's prefix) answer with their own members of a group and their own
/// counters, which the inspect traffic does not change; garbage requests do not stop them;
/// an instance that closed does not answer, nor does the asker; `flush` leaves an instance
/// answering. Where the backend is not cross-process, asking is `Unsupported`.
pub async fn inspect_answers_from_every_other_instance(ctx: Ctx) {
    use chanlayer_core::{inspect, Error, Message};
    let asker = ctx.layer().await;
    if !caps(&asker).cross_process {
        let e = inspect::stats(&*asker, Duration::from_millis(10)).await;
        crate::assert_err(e, "inspect on a process-local layer", |e| {
            matches!(e, Error::Unsupported { .. })
        });
        return;
    }
    let (a, b, c) = (ctx.layer().await, ctx.layer().await, ctx.layer().await);
    let group = ctx.name("inspected");
    let (a1, a2) = (
        a.new_channel("m").await.expect("new_channel"),
        a.new_channel("m").await.expect("new_channel"),
    );
    let b1 = b.new_channel("m").await.expect("new_channel");
    let c1 = c.new_channel("m").await.expect("new_channel");
    for (l, ch) in [(&a, &a1), (&a, &a2), (&b, &b1), (&c, &c1)] {
        l.group_add(&group, ch).await.expect("group_add");
    }
    a.send(&a1, seq_msg(1, Codec::Json)).await.expect("send");
    assert_eq!(seq_of(&recv(&a, &a1).await), 1);
    c.close().await.expect("close");
    // Requests that are not: skipped, counted nowhere, and the answering goes on.
    for garbage in [
        Message::encode_as(inspect::REQUEST_TYPE, &"garbage", Codec::Json),
        Message::encode_as(inspect::REQUEST_TYPE, &[1, 2, 3], Codec::Bincode),
        Message::encode_as("chat.message", &"hi", Codec::Json),
        Message::encode_as(
            inspect::REQUEST_TYPE,
            &std::collections::BTreeMap::from([("what", "stats"), ("reply_to", "normal-ch")]),
            Codec::Json,
        ),
    ] {
        let garbage = garbage.expect("encodes");
        asker
            .group_send(inspect::GROUP, garbage)
            .await
            .expect("group_send garbage");
    }
    let ids = |want: &[&std::sync::Arc<dyn chanlayer_core::ChannelLayer>]| {
        let mut ids: Vec<String> = want.iter().map(|l| l.instance_id().to_owned()).collect();
        ids.sort();
        ids
    };
    let (want, wait) = (ids(&[&a, &b]), Duration::from_millis(500));
    // Asked until both answer within one `wait` (replies cross the broker), then checked.
    let members = |asker: std::sync::Arc<dyn chanlayer_core::ChannelLayer>, group: String| {
        let want = want.clone();
        async move {
            let started = std::time::Instant::now();
            loop {
                let got = inspect::groups(&*asker, &group, wait)
                    .await
                    .expect("inspect::groups");
                let instances: Vec<String> = got.iter().map(|r| r.instance.clone()).collect();
                if instances == want || started.elapsed() > crate::ARRIVAL_DEADLINE {
                    return got;
                }
            }
        }
    };
    let got = members(asker.clone(), group.clone()).await;
    let instances: Vec<&str> = got.iter().map(|r| r.instance.as_str()).collect();
    assert_eq!(
        instances, want,
        "a and b answer; c (closed) and the asker do not: {got:?}"
    );
    for r in &got {
        assert_eq!(r.backend, caps(&a).backend);
        let expected = if r.instance == a.instance_id() {
            let mut m = vec![a1.clone(), a2.clone()];
            m.sort();
            m
        } else {
            vec![b1.clone()]
        };
        assert_eq!(r.members, expected, "{}'s own members", r.instance);
    }
    let started = std::time::Instant::now();
    let stats = loop {
        let got = inspect::stats(&*asker, wait).await.expect("inspect::stats");
        let instances: Vec<String> = got.iter().map(|r| r.instance.clone()).collect();
        if instances == want || started.elapsed() > crate::ARRIVAL_DEADLINE {
            break got;
        }
    };
    let instances: Vec<&str> = stats.iter().map(|r| r.instance.as_str()).collect();
    assert_eq!(instances, want, "{stats:?}");
    for r in &stats {
        let own = if r.instance == a.instance_id() {
            &a
        } else {
            &b
        };
        assert_eq!(
            r.stats,
            own.stats(),
            "{}'s counters, untouched by the inspect traffic",
            r.instance
        );
    }
    let a_stats = &stats[instances
        .iter()
        .position(|i| *i == a.instance_id())
        .expect("a")];
    assert_eq!((a_stats.stats.sent, a_stats.stats.received), (1, 1));
    // After a flush, b answers still, with no members.
    b.flush().await.expect("flush");
    let got = members(asker.clone(), group.clone()).await;
    let b_reply = got.iter().find(|r| r.instance == b.instance_id());
    assert_eq!(
        b_reply.map(|r| r.members.clone()),
        Some(Vec::new()),
        "b answers after flush: {got:?}"
    );
}
