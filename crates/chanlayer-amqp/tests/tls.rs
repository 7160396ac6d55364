//! `amqps://` against the local RabbitMQ's TLS listener (127.0.0.1:5671), whose certificate
//! is signed by a throwaway test CA that `scripts/brokers/rabbitmq.sh` generates into
//! `CHANLAYER_TLS_DIR` (default `/var/lib/chanlayer-tests/tls`).

use std::path::PathBuf;
use std::time::Duration;

use chanlayer_amqp::AmqpLayer;
use chanlayer_core::{ChannelLayer, Codec, Error, LayerConfig, Message};

fn ca_file() -> PathBuf {
    let dir = std::env::var("CHANLAYER_TLS_DIR")
        .unwrap_or_else(|_| "/var/lib/chanlayer-tests/tls".to_owned());
    let ca = PathBuf::from(dir).join("ca_certificate.pem");
    assert!(
        ca.exists(),
        "{} is missing: run scripts/brokers/rabbitmq.sh (scripts/test does) to make the test CA and the TLS listener",
        ca.display()
    );
    ca
}

fn tls_url(host: &str, extra: &str) -> String {
    format!("amqps://guest:guest@{host}:5671/%2f?prefix=tls{}&queue_expires=60s&connection_timeout=5s{extra}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_the_test_ca_round_trips() {
    let ca = ca_file();
    for host in ["127.0.0.1", "localhost"] {
        let url = tls_url(host, &format!("&ca_file={}", ca.display()));
        let config = LayerConfig::from_url(&url).expect("parse");
        let layer = AmqpLayer::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("amqps to {host} with the test CA: {e}"));
        let me = layer.new_channel("tls").await.expect("new_channel");
        let normal = format!("tls{}.jobs", std::process::id());
        for ch in [me.as_str(), normal.as_str()] {
            layer
                .send(
                    ch,
                    Message::encode_as("t", &"over tls", Codec::Json).expect("encode"),
                )
                .await
                .expect("send over TLS");
            let got = tokio::time::timeout(Duration::from_secs(15), layer.receive(ch))
                .await
                .expect("arrives")
                .expect("receive");
            assert_eq!(got.decode::<String>().expect("decode"), "over tls");
        }
        layer.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_without_the_ca_refuses_the_untrusted_certificate() {
    let _ = ca_file();
    // System roots only: the test CA is not among them.
    let config = LayerConfig::from_url(&tls_url("127.0.0.1", "")).expect("parse");
    let err = AmqpLayer::connect(&config)
        .await
        .expect_err("an untrusted certificate is refused");
    assert!(
        matches!(err, Error::Backend { .. } | Error::Timeout { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("amqps://127.0.0.1:5671"), "{err}");
    assert!(
        err.to_string().contains("UnknownIssuer"),
        "the error says why: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ca_file_is_a_config_error() {
    let config = LayerConfig::from_url(&tls_url("127.0.0.1", "&ca_file=/nonexistent/ca.pem"))
        .expect("parse");
    let err = AmqpLayer::connect(&config).await.expect_err("no such file");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}
