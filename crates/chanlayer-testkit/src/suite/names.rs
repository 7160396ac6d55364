//! Name validation, checked through the layer's own operations.

use std::sync::Arc;

use chanlayer_core::{ChannelLayer, Codec, Error};

use crate::{assert_err, seq_msg, Ctx};

async fn channel_rejected(layer: &Arc<dyn ChannelLayer>, name: &str, rule_words: &str) {
    let is_invalid = |e: &Error| matches!(e, Error::InvalidName { .. });
    let checks = [
        (
            "send",
            layer
                .send(name, seq_msg(1, Codec::Bincode))
                .await
                .map(|_| ()),
        ),
        ("receive", layer.receive(name).await.map(|_| ())),
        ("group_add", layer.group_add("valid-group", name).await),
    ];
    for (op, r) in checks {
        let e = assert_err(r, &format!("{op}({name:?})"), is_invalid);
        let text = e.to_string();
        assert!(
            text.contains(rule_words),
            "{op}({name:?}): the error should name the rule ({rule_words:?}): {text}"
        );
    }
}

async fn group_rejected(layer: &Arc<dyn ChannelLayer>, name: &str, rule_words: &str) {
    let is_invalid = |e: &Error| matches!(e, Error::InvalidName { .. });
    let checks = [
        (
            "group_send",
            layer.group_send(name, seq_msg(1, Codec::Bincode)).await,
        ),
        ("group_add", layer.group_add(name, "valid-channel").await),
        (
            "group_discard",
            layer.group_discard(name, "valid-channel").await,
        ),
    ];
    for (op, r) in checks {
        let e = assert_err(r, &format!("{op}({name:?})"), is_invalid);
        let text = e.to_string();
        assert!(
            text.contains(rule_words),
            "{op}({name:?}): the error should name the rule ({rule_words:?}): {text}"
        );
    }
}

/// Valid channel and group names are accepted by every operation.
pub async fn names_valid_pass(ctx: Ctx) {
    let l = ctx.layer().await;
    for suffix in ["a", "A.b-c_d", "0.9", "x-y.z_1"] {
        let ch = ctx.name(suffix);
        l.send(&ch, seq_msg(7, Codec::Bincode))
            .await
            .expect("valid channel name");
        assert_eq!(crate::seq_of(&crate::recv(&l, &ch).await), 7);
        l.group_add(&ch, &ch).await.expect("valid group name");
        l.group_discard(&ch, &ch).await.expect("valid group name");
    }
    let local = l.new_channel("ok").await.expect("valid prefix");
    l.send(&local, seq_msg(8, Codec::Bincode))
        .await
        .expect("valid local channel");
    assert_eq!(crate::seq_of(&crate::recv(&l, &local).await), 8);
}

/// A 99-character name passes; 100 characters is `InvalidName` naming the limit.
pub async fn names_99_pass_100_fail(ctx: Ctx) {
    let l = ctx.layer().await;
    let base = ctx.name("");
    let n99 = format!("{base}{}", "x".repeat(99 - base.len()));
    assert_eq!(n99.len(), 99);
    l.send(&n99, seq_msg(1, Codec::Bincode))
        .await
        .expect("99 characters is valid");
    assert_eq!(crate::seq_of(&crate::recv(&l, &n99).await), 1);
    l.group_add(&n99, &n99)
        .await
        .expect("99-character group is valid");
    let n100 = format!("{n99}x");
    channel_rejected(&l, &n100, "99").await;
    group_rejected(&l, &n100, "99").await;
}

/// A non-ASCII name is `InvalidName` saying names are ASCII.
pub async fn names_non_ascii_fails(ctx: Ctx) {
    let l = ctx.layer().await;
    channel_rejected(&l, &ctx.name("caf\u{e9}"), "ASCII").await;
    group_rejected(&l, &ctx.name("gr\u{fc}n"), "ASCII").await;
}

/// A trailing newline is `InvalidName` naming the control character.
pub async fn names_trailing_newline_fails(ctx: Ctx) {
    let l = ctx.layer().await;
    channel_rejected(&l, &format!("{}\n", ctx.name("ch")), "control character").await;
    group_rejected(&l, &format!("{}\n", ctx.name("gr")), "control character").await;
}

/// `?` is `InvalidName` naming the character and what is allowed.
pub async fn names_question_mark_fails(ctx: Ctx) {
    let l = ctx.layer().await;
    channel_rejected(&l, &ctx.name("a?b"), "'?'").await;
    group_rejected(&l, &ctx.name("a?b"), "allowed are").await;
}

/// Two `!` in a channel name is `InvalidName`.
pub async fn names_two_bangs_fail(ctx: Ctx) {
    let l = ctx.layer().await;
    channel_rejected(&l, &ctx.name("a!b!c"), "more than one '!'").await;
}

/// The empty name is `InvalidName` saying it is empty.
pub async fn names_empty_fails(ctx: Ctx) {
    let l = ctx.layer().await;
    channel_rejected(&l, "", "empty").await;
    group_rejected(&l, "", "empty").await;
    let r = l.new_channel("").await;
    assert_err(r, "new_channel(\"\")", |e| {
        matches!(e, Error::InvalidName { .. })
    });
}

/// `!` in a group name (or a `new_channel` prefix) is `InvalidName`.
pub async fn names_bang_in_group_fails(ctx: Ctx) {
    let l = ctx.layer().await;
    group_rejected(&l, &ctx.name("room!1"), "group names cannot contain '!'").await;
    let r = l.new_channel("pre!fix").await;
    assert_err(r, "new_channel(\"pre!fix\")", |e| {
        matches!(e, Error::InvalidName { .. })
    });
}
