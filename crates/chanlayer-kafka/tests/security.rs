//! SASL_SSL with SCRAM-SHA-512, and TLS alone, end to end against the Apache Kafka broker
//! that `scripts/brokers/kafka.sh` starts (listeners on 127.0.0.1:9094 and :9095, its test
//! CA, a SCRAM user made when the broker was formatted).
//!
//! The SASL_SSL configuration has exactly the shape of a Celery/kombu deployment's:
//! `security.protocol=SASL_SSL`, `sasl.mechanism=SCRAM-SHA-512`, the user name and password
//! from the environment (`KAFKA_SASL_USERNAME`, `KAFKA_SASL_PASSWORD`; defaults: the
//! script's test user), and the CA file (`KAFKA_CA_FILE`; default: the script's test CA).
//! `KAFKA_SASL_BOOTSTRAP` and `KAFKA_SSL_BOOTSTRAP` point the tests at other listeners.

use std::time::{Duration, Instant};

use chanlayer_core::{ChannelLayer, Codec, LayerConfig, Message};
use chanlayer_kafka::KafkaLayer;
use chanlayer_testkit::secrets::encode as enc;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

fn ca_file() -> String {
    std::env::var("KAFKA_CA_FILE").unwrap_or_else(|_| {
        let dir = env_or("CHANLAYER_TLS_DIR", "/var/lib/chanlayer-tests/tls");
        format!("{dir}/ca_certificate.pem")
    })
}

fn prefix() -> String {
    format!("sec{:016x}", rand::random::<u64>())
}

/// The kombu-shaped SASL_SSL URL with `password`.
fn sasl_url(password: &str) -> String {
    format!(
        "kafka://{}?security.protocol=SASL_SSL&sasl.mechanism=SCRAM-SHA-512&username={}&password={}&ca_file={}&prefix={}&connection_timeout=10s",
        env_or("KAFKA_SASL_BOOTSTRAP", "127.0.0.1:9094"),
        enc(&env_or("KAFKA_SASL_USERNAME", "chanlayer")),
        enc(password),
        enc(&ca_file()),
        prefix()
    )
}

fn password() -> String {
    env_or("KAFKA_SASL_PASSWORD", "chanlayer-test-secret")
}

fn tls_url(ca: &str) -> String {
    format!(
        "kafka://{}?security.protocol=SSL&ca_file={}&prefix={}&connection_timeout=10s",
        env_or("KAFKA_SSL_BOOTSTRAP", "127.0.0.1:9095"),
        enc(ca),
        prefix()
    )
}

async fn connect(url: &str) -> chanlayer_core::Result<KafkaLayer> {
    KafkaLayer::connect(&LayerConfig::from_url(url)?).await
}

/// send / receive on a process-local and a normal channel, group_send to a member.
async fn exercise(layer: &KafkaLayer) {
    let within = Duration::from_secs(30);
    let me = layer.new_channel("sec").await.expect("new_channel");
    let hi = Message::encode_as("hello", &"direct", Codec::Json).expect("encode");
    layer.send(&me, hi).await.expect("send");
    let got = tokio::time::timeout(within, layer.receive(&me))
        .await
        .expect("in time")
        .expect("receive");
    assert_eq!(got.decode::<String>().expect("decode"), "direct");

    layer.group_add("sec.room", &me).await.expect("group_add");
    let all = Message::encode_as("hello", &"group", Codec::Json).expect("encode");
    layer.group_send("sec.room", all).await.expect("group_send");
    let got = tokio::time::timeout(within, layer.receive(&me))
        .await
        .expect("in time")
        .expect("receive");
    assert_eq!(got.decode::<String>().expect("decode"), "group");

    let job = Message::encode_as("job", &"normal", Codec::Json).expect("encode");
    layer
        .send("sec.jobs", job)
        .await
        .expect("send to a normal channel");
    let got = tokio::time::timeout(within, layer.receive("sec.jobs"))
        .await
        .expect("in time")
        .expect("receive");
    assert_eq!(got.decode::<String>().expect("decode"), "normal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_scram_sha_512_sends_receives_and_group_sends() {
    let layer = connect(&sasl_url(&password()))
        .await
        .expect("connect over SASL_SSL with SCRAM-SHA-512");
    exercise(&layer).await;
    layer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_authentication_error_that_never_shows_it() {
    let wrong = "not-the-Pa55word-7b1e";
    let started = Instant::now();
    let err = connect(&sasl_url(wrong))
        .await
        .expect_err("the broker refuses the credentials");
    let (shown, debug) = (err.to_string(), format!("{err:?}"));
    eprintln!("wrong password after {:?}: {shown}", started.elapsed());
    assert!(
        shown.to_lowercase().contains("authentication"),
        "the error names authentication: {shown}"
    );
    for text in [&shown, &debug] {
        assert!(!text.contains(wrong), "the password shows: {text}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it fails when the broker refuses, not after connection_timeout ({:?})",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_sends_receives_and_group_sends() {
    let layer = connect(&tls_url(&ca_file()))
        .await
        .expect("connect over TLS");
    exercise(&layer).await;
    layer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_an_unknown_ca_is_a_tls_error() {
    // The system's roots do not include the test CA that signed the broker's certificate.
    let err = connect(&tls_url("/etc/ssl/certs/ca-certificates.crt"))
        .await
        .expect_err("the certificate does not verify");
    let shown = err.to_string();
    assert!(
        shown.contains("TLS") && shown.contains("certificate verify failed"),
        "the error names TLS and the certificate: {shown}"
    );
}
