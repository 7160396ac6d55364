//! The facade: connect by URL, typed conveniences, aliases, features, redaction.

use std::time::Duration;

use chanlayer::{Codec, Error, Layer, Layers, MessageType};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Chat {
    room: String,
    text: String,
}

impl MessageType for Chat {
    fn message_type(&self) -> &str {
        "chat.message"
    }
}

#[tokio::test]
async fn connect_memory_and_use_typed_api() {
    let layer = chanlayer::connect("memory://?codec=msgpack")
        .await
        .expect("connect");
    assert_eq!(layer.capabilities().backend, "memory");
    assert_eq!(layer.options().codec, Codec::Msgpack);
    let me = layer.new_channel("ws").await.expect("new_channel");
    let chat = Chat {
        room: "42".into(),
        text: "hi".into(),
    };
    layer.send(&me, &chat).await.expect("send");
    let msg = layer.receive(&me).await.expect("receive");
    assert_eq!(msg.message_type(), "chat.message");
    assert_eq!(msg.codec(), Codec::Msgpack);
    assert_eq!(msg.decode::<Chat>().expect("decode"), chat);

    layer.group_add("room.42", &me).await.expect("group_add");
    layer
        .group_send("room.42", &chat)
        .await
        .expect("group_send");
    assert_eq!(
        layer.receive_as::<Chat>(&me).await.expect("receive_as"),
        chat
    );
    layer
        .group_send_as("room.42", "chat.raw", &"plain")
        .await
        .expect("group_send_as");
    assert_eq!(
        layer.receive_as::<String>(&me).await.expect("receive_as"),
        "plain"
    );
}

#[tokio::test]
async fn clones_are_one_instance_and_named_brokers_are_shared() {
    let a = chanlayer::connect("memory://facade-shared")
        .await
        .expect("connect");
    let a2 = a.clone();
    assert_eq!(a.instance_id(), a2.instance_id());
    let b = chanlayer::connect("memory://facade-shared")
        .await
        .expect("connect");
    assert_ne!(a.instance_id(), b.instance_id());
    let inbox = b.new_channel("x").await.expect("new_channel");
    a2.send_as(&inbox, "hello", &1u32)
        .await
        .expect("send across instances");
    assert_eq!(b.receive_as::<u32>(&inbox).await.expect("receive"), 1);
    // A private memory:// broker does not see the shared one.
    let private = chanlayer::connect("memory://").await.expect("connect");
    private.send_as("work", "t", &1u8).await.expect("send");
    let nothing = tokio::time::timeout(Duration::from_millis(100), a.receive("work")).await;
    assert!(nothing.is_err(), "a private broker is private");
    a.close().await.expect("close");
    assert!(
        matches!(a2.receive("work").await, Err(Error::Closed)),
        "a clone sees the close"
    );
}

#[tokio::test]
async fn batch_handler_through_the_facade() {
    let layer = chanlayer::connect("memory://").await.expect("connect");
    for i in 0..3u32 {
        layer.send_as("jobs", "job", &i).await.expect("send");
    }
    let r = layer
        .handle_batch("jobs", 10, Duration::from_secs(5), |msgs| async move {
            assert_eq!(msgs.len(), 3);
            Err::<(), _>("boom")
        })
        .await;
    assert!(matches!(r, Err(chanlayer::BatchError::Handler("boom"))));
    let n = layer
        .handle_batch("jobs", 10, Duration::from_secs(5), |msgs| async move {
            let v: Vec<u32> = msgs.iter().map(|m| m.decode().expect("decode")).collect();
            assert_eq!(v, vec![0, 1, 2], "the failed batch came back in order");
            Ok::<(), ()>(())
        })
        .await
        .expect("handled");
    assert_eq!(n, 3);
}

#[tokio::test]
async fn compiled_out_backends_name_their_feature() {
    // Backends that are compiled in are tested against their brokers in their own crates
    // (and `zmq` below); here the compiled-out case: an error naming the feature.
    for (url, feature, enabled) in [
        ("kafka://127.0.0.1:9092", "kafka", cfg!(feature = "kafka")),
        ("zmq://127.0.0.1:5556", "zmq", cfg!(feature = "zmq")),
        (
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqp",
            cfg!(feature = "amqp"),
        ),
        (
            "amqps://guest:guest@127.0.0.1:5671/%2f",
            "amqp",
            cfg!(feature = "amqp"),
        ),
    ] {
        if enabled {
            continue;
        }
        let err = chanlayer::connect(url).await.expect_err("compiled out");
        let text = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{url}: {err:?}");
        assert!(text.contains(&format!("`{feature}`")), "{url}: {text}");
        assert!(text.contains("enable the cargo feature"), "{text}");
    }
    let err = chanlayer::connect("redis://127.0.0.1")
        .await
        .expect_err("unknown scheme");
    assert!(err.to_string().contains("unknown scheme"), "{err}");
}

/// With the `zmq` feature, a `zmq://` URL connects through the facade (no service needed:
/// this process binds the publisher on a free loopback port) and a message round-trips.
#[cfg(feature = "zmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zmq_urls_connect_through_the_facade() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let layer = chanlayer::connect(&format!("zmq://127.0.0.1:{port}?bind=eager"))
        .await
        .expect("connect");
    assert_eq!(layer.capabilities().backend, "zmq");
    let me = layer.new_channel("facade").await.expect("new_channel");
    layer.send_as(&me, "n", &7u32).await.expect("send");
    assert_eq!(layer.receive_as::<u32>(&me).await.expect("receive"), 7);
    layer.close().await.expect("close");
}

#[tokio::test]
async fn passwords_never_show() {
    let secret = "pa55-w0rd-XYZ";
    let url =
        format!("amqp://guest:{secret}@127.0.0.1:5672/%2f?sasl.password={secret}&capacity=oops");
    let err = chanlayer::connect(&url).await.expect_err("bad capacity");
    assert!(!format!("{err} {err:?}").contains(secret), "{err:?}");
    let cfg = chanlayer::LayerConfig::from_url(&url.replace("capacity=oops", "capacity=5"))
        .expect("parse");
    for text in [cfg.to_string(), format!("{cfg:?}")] {
        assert!(!text.contains(secret), "{text}");
    }
    let err = chanlayer::connect(&url.replace("capacity=oops", "capacity=5"))
        .await
        .expect_err("amqp compiled out, or an unknown option (sasl.password) for amqp");
    assert!(!format!("{err} {err:?}").contains(secret), "{err:?}");
    let layers = Layers::from_toml_str(&format!(
        "[layers.db]\nurl = \"amqp://u:{secret}@h/%2f\"\n[layers.db.backend]\n\"sasl.password\" = \"{secret}\"\n"
    ))
    .expect("parse");
    assert!(!format!("{layers:?}").contains(secret));
    let err = layers
        .get("db")
        .await
        .expect_err("amqp compiled out, or an unknown option for amqp");
    assert!(!format!("{err} {err:?}").contains(secret));
}

#[tokio::test]
async fn toml_aliases_with_options_beside_the_url() {
    let layers = Layers::from_toml_str(
        r#"
        [layers.default]
        url = "memory://?capacity=50&expiry=10"
        capacity = 3
        group_expiry = "2m"
        codec = "json"

        [layers.default.channel_capacity]
        "http.*" = 7
        "*" = 9

        [layers.other]
        url = "memory://toml-other"
        "#,
    )
    .expect("parse");
    let mut aliases: Vec<&str> = layers.aliases().collect();
    aliases.sort_unstable();
    assert!(
        aliases.contains(&"default") && aliases.contains(&"other"),
        "{aliases:?}"
    );
    let d: Layer = layers.get("default").await.expect("default");
    let o = d.options();
    assert_eq!(o.capacity, 3, "options beside the url win over the query");
    assert_eq!(o.expiry, Duration::from_secs(10), "the query still applies");
    assert_eq!(o.group_expiry, Duration::from_secs(120));
    assert_eq!(o.codec, Codec::Json);
    assert_eq!(
        o.capacity_for("http.x"),
        7,
        "patterns in file order, first match wins"
    );
    assert_eq!(o.capacity_for("ws.x"), 9);
    let again = layers.get("default").await.expect("default again");
    assert_eq!(again.instance_id(), d.instance_id(), "get connects once");
    let err = layers.get("missing").await.expect_err("unknown alias");
    assert!(err.to_string().contains("CHANLAYER_MISSING_URL"), "{err}");
}

#[tokio::test]
async fn toml_errors_are_clear() {
    let e = Layers::from_toml_str("[layers.x]\ncapacity = 3\n").expect_err("no url");
    assert!(e.to_string().contains("has no url"), "{e}");
    let e =
        Layers::from_toml_str("[layers.x]\nurl = \"memory://\"\ncapacty = 3\n").expect_err("typo");
    assert!(e.to_string().contains("capacty"), "{e}");
    // Backend options are the backend's to judge, when it connects.
    let layers = Layers::from_toml_str("[layers.x]\nurl = \"memory://?bogus=1\"\n").expect("parse");
    let e = layers.get("x").await.expect_err("unknown option");
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = Layers::from_toml_str("layers = 3").expect_err("not a table");
    assert!(matches!(e, Error::Config(_)));
}

#[tokio::test]
async fn environment_urls() {
    // Unique variable names: tests in this binary run in parallel.
    std::env::set_var("CHANLAYER_ENVTEST_ONE_URL", "memory://env-one?capacity=4");
    let layers =
        Layers::from_toml_str("[layers.envtest-one]\nurl = \"memory://file\"\ncodec = \"json\"\n")
            .expect("parse");
    let l = layers
        .get("envtest-one")
        .await
        .expect("alias from file, url from env");
    assert_eq!(l.options().capacity, 4, "the env URL replaced the file URL");
    assert_eq!(l.options().codec, Codec::Json, "file options still apply");

    std::env::set_var("CHANLAYER_ENVTEST_TWO_URL", "memory://?capacity=6");
    let env_only = Layers::from_env().expect("env");
    let l = env_only
        .get("envtest_two")
        .await
        .expect("alias from env alone");
    assert_eq!(l.options().capacity, 6);
}

#[tokio::test]
async fn memory_rejects_unknown_options_and_credentials() {
    let e = chanlayer::connect("memory://?heartbeat=5")
        .await
        .expect_err("unknown option");
    assert!(e.to_string().contains("heartbeat"), "{e}");
    let e = chanlayer::connect("memory://user:pw@x")
        .await
        .expect_err("credentials");
    assert!(e.to_string().contains("no user or password"), "{e}");
}
