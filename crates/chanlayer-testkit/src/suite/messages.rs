//! Messages: round trips per codec, ordering, size limits, type rules, codecs, garbage.

use std::collections::BTreeMap;

use chanlayer_core::toolkit::Envelope;
use chanlayer_core::{Codec, Error, Message, MessageType};
use serde::{Deserialize, Serialize};

use crate::{assert_err, eventually, recv, seq_msg, seq_of, Ctx};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payload {
    id: u64,
    text: String,
    tags: Vec<String>,
    score: Option<f64>,
    nested: BTreeMap<String, i32>,
}

impl MessageType for Payload {
    fn message_type(&self) -> &str {
        "test.payload"
    }
}

fn payload() -> Payload {
    Payload {
        id: 42,
        text: "héllo, wörld ✓".into(),
        tags: vec!["a".into(), "b".into()],
        score: Some(0.25),
        nested: [("x".to_string(), -1), ("y".to_string(), 2)].into(),
    }
}

async fn round_trip(ctx: Ctx, codec: Codec) {
    let l = ctx.layer().await;
    let ch = ctx.name("rt");
    let local = l.new_channel("rt").await.expect("new_channel");
    for target in [ch.as_str(), local.as_str()] {
        let msg = Message::encode(&payload(), codec)
            .expect("encode")
            .with_header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .with_header("refs", "a,b");
        l.send(target, msg.clone()).await.expect("send");
        let got = recv(&l, target).await;
        assert_eq!(got.message_type(), "test.payload");
        assert_eq!(got.codec(), codec);
        assert_eq!(got.headers(), msg.headers(), "headers survive");
        assert_eq!(got.body(), msg.body(), "body bytes survive");
        assert_eq!(got.decode::<Payload>().expect("decode"), payload());
    }
}

/// Type, body and headers survive a round trip in bincode.
pub async fn round_trip_bincode(ctx: Ctx) {
    round_trip(ctx, Codec::Bincode).await;
}

/// Type, body and headers survive a round trip in msgpack.
pub async fn round_trip_msgpack(ctx: Ctx) {
    round_trip(ctx, Codec::Msgpack).await;
}

/// Type, body and headers survive a round trip in json.
pub async fn round_trip_json(ctx: Ctx) {
    round_trip(ctx, Codec::Json).await;
}

/// A receive that is waiting before the send gets the message.
pub async fn receive_started_before_send(ctx: Ctx) {
    let l = ctx.layer().await;
    for ch in [
        ctx.name("early"),
        l.new_channel("early").await.expect("new_channel"),
    ] {
        let (l2, ch2) = (l.clone(), ch.clone());
        let waiting = tokio::spawn(async move { recv(&l2, &ch2).await });
        // Let the receiver get to its wait; it must work however far it got.
        tokio::task::yield_now().await;
        l.send(&ch, seq_msg(5, Codec::Bincode)).await.expect("send");
        let got = waiting.await.expect("receiver task");
        assert_eq!(seq_of(&got), 5);
    }
}

/// 1,000 messages from one sender to one process-local channel arrive in order.
pub async fn fifo_1000_local(ctx: Ctx) {
    let l = ctx
        .layer_with(chanlayer_core::LayerOptions {
            capacity: 2000,
            ..ctx.options()
        })
        .await;
    let ch = l.new_channel("fifo").await.expect("new_channel");
    let (l2, ch2) = (l.clone(), ch.clone());
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(1000);
        for _ in 0..1000 {
            got.push(seq_of(&recv(&l2, &ch2).await));
        }
        got
    });
    for i in 0..1000 {
        l.send(&ch, seq_msg(i, Codec::Bincode)).await.expect("send");
    }
    let got = reader.await.expect("reader");
    let expected: Vec<u64> = (0..1000).collect();
    assert_eq!(got, expected, "messages arrive in the order sent");
}

/// A 1 MiB body makes the round trip intact.
pub async fn one_mib_round_trip(ctx: Ctx) {
    let l = ctx.layer().await;
    let body: Vec<u8> = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    let local = l.new_channel("big").await.expect("new_channel");
    for ch in [ctx.name("big"), local] {
        let msg = Message::new("test.big", Codec::Bincode, body.clone());
        l.send(&ch, msg).await.expect("1 MiB send");
        let got = recv(&l, &ch).await;
        assert_eq!(got.body().len(), body.len());
        assert!(got.body() == body.as_slice(), "1 MiB body intact");
    }
}

/// Over `max_message_size` is `MessageTooLarge`, and nothing was sent.
pub async fn too_large_fails_before_sending(ctx: Ctx) {
    let max = 64 * 1024;
    let l = ctx
        .layer_with(chanlayer_core::LayerOptions {
            max_message_size: max,
            ..ctx.options()
        })
        .await;
    let ch = ctx.name("limit");
    let group = ctx.name("limit-group");
    l.group_add(&group, &ch).await.expect("group_add");
    let big = Message::new("test.big", Codec::Bincode, vec![7; max + 1]);
    let is_large = |e: &Error| matches!(e, Error::MessageTooLarge { .. });
    assert_err(
        l.send(&ch, big.clone()).await,
        "send over the limit",
        is_large,
    );
    assert_err(
        l.group_send(&group, big.clone()).await,
        "group_send over the limit",
        is_large,
    );
    assert_err(
        l.send_batch(&ch, vec![seq_msg(0, Codec::Bincode), big])
            .await,
        "send_batch with one message over the limit",
        is_large,
    );
    // Nothing of the above was sent: the first message on the channel is the marker.
    l.send(&ch, seq_msg(99, Codec::Bincode))
        .await
        .expect("marker");
    assert_eq!(
        seq_of(&recv(&l, &ch).await),
        99,
        "the oversized sends sent nothing"
    );
    let fits = Message::new("test.fits", Codec::Bincode, vec![1; max / 2]);
    l.send(&ch, fits)
        .await
        .expect("a message under the limit is sent");
    assert_eq!(recv(&l, &ch).await.body().len(), max / 2);
}

/// A message with no type or a malformed type is `InvalidMessage`.
pub async fn invalid_type_fails(ctx: Ctx) {
    let l = ctx.layer().await;
    let ch = ctx.name("types");
    let group = ctx.name("types-group");
    for bad in ["", "_private", ".dot", "has space", "nl\n"] {
        let msg = Message::new(bad, Codec::Json, b"1".to_vec());
        let is_invalid = |e: &Error| matches!(e, Error::InvalidMessage(_));
        let e = assert_err(
            l.send(&ch, msg.clone()).await,
            &format!("send type {bad:?}"),
            is_invalid,
        );
        assert!(
            e.to_string().contains("type"),
            "the error talks about the type: {e}"
        );
        assert_err(
            l.group_send(&group, msg).await,
            &format!("group_send type {bad:?}"),
            is_invalid,
        );
        assert_err(
            Message::encode_as(bad, &1u8, Codec::Json),
            &format!("encode_as type {bad:?}"),
            is_invalid,
        );
    }
    l.send(&ch, seq_msg(1, Codec::Bincode))
        .await
        .expect("a valid type");
    assert_eq!(
        seq_of(&recv(&l, &ch).await),
        1,
        "the invalid messages sent nothing"
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Plain {
    Unit,
    Tuple(u32, String),
    Struct { a: i64, b: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
enum Tagged {
    Join {
        user: String,
    },
    Leave {
        user: String,
        reason: Option<String>,
    },
}

/// Structs and plain enums round-trip in all three codecs.
pub async fn codec_struct_and_enum_round_trip(ctx: Ctx) {
    let l = ctx.layer().await;
    let ch = ctx.name("codecs");
    for codec in Codec::ALL {
        let values = [
            Plain::Unit,
            Plain::Tuple(3, "t".into()),
            Plain::Struct {
                a: -5,
                b: vec![0, 255],
            },
        ];
        for v in values {
            l.send(
                &ch,
                Message::encode_as("test.enum", &v, codec).expect("encode"),
            )
            .await
            .expect("send");
            assert_eq!(
                recv(&l, &ch).await.decode::<Plain>().expect("decode enum"),
                v,
                "{codec}"
            );
        }
        l.send(&ch, Message::encode(&payload(), codec).expect("encode"))
            .await
            .expect("send");
        assert_eq!(
            recv(&l, &ch)
                .await
                .decode::<Payload>()
                .expect("decode struct"),
            payload(),
            "{codec}"
        );
    }
}

/// A `#[serde(tag = "...")]` enum works with msgpack and json, and is a clear `Codec` error
/// (naming the fix) with bincode, never a panic.
pub async fn codec_tagged_enum(ctx: Ctx) {
    let l = ctx.layer().await;
    let ch = ctx.name("tagged");
    let values = [
        Tagged::Join { user: "ann".into() },
        Tagged::Leave {
            user: "bob".into(),
            reason: Some("bye".into()),
        },
    ];
    for codec in [Codec::Msgpack, Codec::Json] {
        for v in &values {
            l.send(
                &ch,
                Message::encode_as("test.tagged", v, codec).expect("encode"),
            )
            .await
            .expect("send");
            assert_eq!(
                &recv(&l, &ch)
                    .await
                    .decode::<Tagged>()
                    .expect("decode tagged"),
                v
            );
        }
    }
    let outcome = match Message::encode_as("test.tagged", &values[0], Codec::Bincode) {
        Err(e) => Err(e),
        Ok(m) => {
            l.send(&ch, m).await.expect("send");
            recv(&l, &ch).await.decode::<Tagged>()
        }
    };
    let e = assert_err(outcome, "tagged enum with bincode", |e| {
        matches!(e, Error::Codec { .. })
    });
    let text = e.to_string();
    assert!(
        text.contains("msgpack") && text.contains("json"),
        "the error names the fix: {text}"
    );
}

/// Undecodable bytes reaching the consumer are skipped and counted, and the next valid
/// message arrives.
pub async fn undecodable_bytes_skipped_and_counted(ctx: Ctx) {
    let l = ctx.layer().await;
    let inject = ctx.injector(&l);
    let valid = Envelope::seal(
        chanlayer_core::toolkit::Destination::Channel,
        "x",
        seq_msg(1, Codec::Bincode),
        &ctx.options(),
    )
    .expect("seal")
    .encode();
    let mut wrong_version = valid.clone();
    wrong_version[2] = 0xEE;
    let garbage: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"not an envelope at all".to_vec(),
        valid[..valid.len() / 2].to_vec(),
        wrong_version,
        vec![
            b'C', b'L', 1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        ],
    ];
    let n = garbage.len() as u64;
    for target in [
        ctx.name("garbage"),
        l.new_channel("garbage").await.expect("new_channel"),
    ] {
        let before = ctx.stats_sum().undecodable;
        for g in &garbage {
            inject
                .inject(&target, g.clone())
                .await
                .expect("inject raw bytes");
        }
        l.send(&target, seq_msg(77, Codec::Bincode))
            .await
            .expect("send after garbage");
        assert_eq!(
            seq_of(&recv(&l, &target).await),
            77,
            "the next valid message arrives"
        );
        eventually("the garbage is counted", || {
            ctx.stats_sum().undecodable >= before + n
        })
        .await;
    }
}
