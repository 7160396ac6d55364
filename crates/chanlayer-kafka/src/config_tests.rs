//! Unit tests of the Kafka settings.

use super::*;
use chanlayer_testkit::options::check_refused;

#[test]
fn defaults() {
    let c = KafkaConfig::from_url("kafka://").unwrap();
    assert_eq!(c.brokers, "127.0.0.1:9092");
    assert_eq!((c.partitions, c.replication), (1, -1));
    assert_eq!(c.groups_topic, "chanlayer.groups");
    assert!(c.create_topics);
    assert_eq!(c.effective_protocol(), "plaintext");
    let c = KafkaConfig::from_url("kafka://a:1,b,[::1]:3?prefix=app").unwrap();
    assert_eq!(c.brokers, "a:1,b:9092,[::1]:3");
    assert_eq!(c.groups_topic, "app.groups");
}

#[test]
fn options_and_pass_through() {
    let c = KafkaConfig::from_url("kafka://h:9092?partitions=3&replication=2&retention=2h&create_topics=false&prefetch=7&linger=5ms&kafka.compression.type=lz4&kafka.sasl.password=zzz").unwrap();
    assert_eq!((c.partitions, c.replication, c.prefetch), (3, 2, 7));
    assert_eq!(c.retention, Duration::from_secs(7200));
    assert!(!c.create_topics);
    let p = c.producer_config("me", 1000);
    assert_eq!(p.get("compression.type"), Some("lz4"));
    assert_eq!(p.get("linger.ms"), Some("5"));
    assert_eq!(p.get("enable.idempotence"), Some("true"));
    assert_eq!(p.get("acks"), Some("all"));
    assert!(!format!("{c:?}").contains("zzz"), "{c:?}");
    // The pass-through wins over chanlayer's defaults.
    let c = KafkaConfig::from_url("kafka://h?kafka.acks=1&kafka.enable.auto.commit=true").unwrap();
    assert_eq!(c.producer_config("me", 1).get("acks"), Some("1"));
    assert_eq!(
        c.consumer_config("me", Some("g")).get("enable.auto.commit"),
        Some("true")
    );
    // Topic configs for the topics it creates.
    let c =
        KafkaConfig::from_url("kafka://h?topic.min.insync.replicas=2&topic.cleanup.policy=delete")
            .unwrap();
    assert_eq!(c.topic_properties.get("min.insync.replicas"), Some("2"));
    assert_eq!(c.topic_properties.get("cleanup.policy"), Some("delete"));
    assert!(KafkaConfig::from_url("kafka://h?topic.=1").is_err());
}

/// SASL/SSL options reach librdkafka's configuration.
#[test]
fn sasl_and_ssl_reach_the_client_config() {
    let c = KafkaConfig::from_url("kafka://app:s3cret@k1:9093,k2:9093?security.protocol=SASL_SSL&sasl.mechanism=scram-sha-512&ca_file=/etc/ca.pem").unwrap();
    for cc in [
        c.client_config("x"),
        c.producer_config("x", 10),
        c.consumer_config("x", Some("g")),
    ] {
        assert_eq!(cc.get("bootstrap.servers"), Some("k1:9093,k2:9093"));
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(cc.get("sasl.username"), Some("app"));
        assert_eq!(cc.get("sasl.password"), Some("s3cret"));
        assert_eq!(cc.get("ssl.ca.location"), Some("/etc/ca.pem"));
    }
    // Credentials as options; the protocol follows from them.
    let c = KafkaConfig::from_url("kafka://h?username=u&password=p").unwrap();
    let cc = c.client_config("x");
    assert_eq!(cc.get("security.protocol"), Some("sasl_plaintext"));
    assert_eq!(cc.get("sasl.mechanism"), Some("PLAIN"));
    let c = KafkaConfig::from_url("kafka://h?ca_file=/ca.pem").unwrap();
    assert_eq!(c.client_config("x").get("security.protocol"), Some("ssl"));
    let c = KafkaConfig::from_url("kafka://u:p@h?sasl.mechanism=SCRAM-SHA-256").unwrap();
    assert_eq!(
        c.client_config("x").get("sasl.mechanism"),
        Some("SCRAM-SHA-256")
    );
}

#[test]
fn password_never_shown() {
    let cfg = LayerConfig::from_url("kafka://app:s3cret@h:1?password=other").unwrap();
    assert!(!cfg.to_string().contains("s3cret"));
    assert!(!cfg.to_string().contains("other"));
    let c = KafkaConfig::from_layer_config(&cfg).unwrap();
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("other"),
        "{shown}"
    );
    let e = KafkaConfig::from_url("kafka://u:s3cret@h?partitons=2")
        .unwrap_err()
        .to_string();
    assert!(e.contains("partitons") && !e.contains("s3cret"), "{e}");
}

/// No part of a hostile password, in the URL's user-info or in the `password`,
/// `kafka.sasl.password` and `kafka.ssl.key.password` options, shows in a
/// `KafkaConfig`'s `Debug`, its display address, or an error; the password reaches
/// librdkafka unchanged.
#[test]
fn hostile_passwords_never_show() {
    use chanlayer_testkit::secrets::{check_redaction, encode, hostile_urls, HOSTILE_PASSWORDS};
    let mut accepted = 0;
    for password in HOSTILE_PASSWORDS {
        let enc = encode(password);
        let mut urls = hostile_urls("kafka", password);
        urls.extend([
            format!("kafka://guest:{enc}@h1:9092,h2:9092?sasl.mechanism=SCRAM-SHA-256"),
            format!("kafka://h:9092?username=u&password={enc}"),
            format!("kafka://h:9092?username=u&kafka.sasl.password={enc}"),
            format!("kafka://h:9092?kafka.ssl.key.password={enc}&ca_file=/ca.pem"),
            format!("kafka://h:9092?password={enc}"),
            format!("kafka://h:9092?username=u&password={enc}&partitions=0"),
            format!("kafka://guest:{enc}@h:99999"),
            format!("kafka://guest:{enc}@h?sasl.mechanism=GSSAPI"),
        ]);
        accepted += check_redaction(password, urls, |url| {
            LayerConfig::from_url(url)
                .and_then(|c| KafkaConfig::from_layer_config(&c))
                .map(|c| {
                    let cc = c.client_config("x");
                    let given = cc
                        .get("sasl.password")
                        .or_else(|| cc.get("ssl.key.password"))
                        .map(str::to_owned);
                    (format!("{c:?} {}", c.display_address()), given)
                })
                .map_err(|e| format!("{e} {e:?}"))
        });
    }
    assert!(accepted > 0);
}

/// Every integer option says "too large" or "too small" with its range.
#[test]
fn integers_out_of_range_name_the_range() {
    check_refused(
        KafkaConfig::from_url,
        "kafka://h",
        [
            (
                "partitions",
                "99999999999999999999999",
                "too large; use a whole number from 1 to 2147483647",
            ),
            (
                "partitions",
                "2147483648",
                "too large; use a whole number from 1 to 2147483647",
            ),
            (
                "replication",
                "40000",
                "too large; use a whole number from -1 to 32767",
            ),
            (
                "replication",
                "-2",
                "too small; use a whole number from -1 to 32767",
            ),
            (
                "prefetch",
                "99999999999999999999999",
                "too large; use a whole number from 1 to 18446744073709551615",
            ),
            (
                "prefetch",
                "0",
                "too small; use a whole number from 1 to 18446744073709551615",
            ),
            (
                "capacity",
                "99999999999999999999999",
                "too large; use a whole number from 1 to 18446744073709551615",
            ),
        ],
    );
    assert_eq!(
        KafkaConfig::from_url("kafka://h?replication=32767")
            .unwrap()
            .replication,
        32767
    );
}

/// Timeouts must be positive, through the same rule and message as every backend's.
#[test]
fn zero_timeouts_are_refused() {
    for key in [
        "delivery_timeout",
        "connection_timeout",
        "session_timeout",
        "commit_interval",
    ] {
        let e = KafkaConfig::from_url(&format!("kafka://h?{key}=0"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "option {key}=0: must be more than zero; use a duration from 1ms to"
            )),
            "{e}"
        );
        assert!(
            KafkaConfig::from_url(&format!("kafka://h?{key}=1ms")).is_ok(),
            "{key}"
        );
    }
}

/// Options chanlayer maps onto librdkafka properties are checked against librdkafka's
/// ranges when the URL is read, so librdkafka's own range error never surfaces;
/// at the bounds, librdkafka takes the properties.
#[test]
fn librdkafka_ranges_are_checked_at_parse_time() {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::producer::BaseProducer;
    for (url, needle) in [
        (
            "kafka://h?max_message_size=2000000000",
            "option max_message_size=2000000000: too large; use a whole number from 1 to 999934464 (the kafka backend sets librdkafka's message.max.bytes to max_message_size + 65536, and librdkafka takes message.max.bytes from 1000 to 1000000000)",
        ),
        ("kafka://h?max_message_size=999934465", "option max_message_size=999934465: too large"),
        (
            "kafka://h?session_timeout=2h",
            "option session_timeout=2h: too long; use a duration from 1ms to 1h (librdkafka's session.timeout.ms takes 1 to 3600000)",
        ),
        (
            "kafka://h?linger=16m",
            "option linger=16m: too long; use a duration from 0s to 15m (librdkafka's linger.ms takes 0 to 900000)",
        ),
        ("kafka://h?delivery_timeout=25d", "option delivery_timeout=25d: too long; use a duration from 1ms to 24days 20h 31m 23s 647ms"),
        ("kafka://h?connection_timeout=25d", "option connection_timeout=25d: too long"),
        ("kafka://h?retention=300000000y", "option retention=300000000y: too long"),
    ] {
        let e = KafkaConfig::from_url(url).expect_err(url).to_string();
        assert!(e.contains(needle), "{url}: {e}");
    }
    let c = KafkaConfig::from_url("kafka://h?max_message_size=999934464&session_timeout=1h&linger=15m&delivery_timeout=24d&connection_timeout=24d").unwrap();
    let p = c.producer_config("x", 999_934_464);
    assert_eq!(p.get("message.max.bytes"), Some("1000000000"));
    if let Err(e) = p.create::<BaseProducer>() {
        panic!("librdkafka refuses the producer at the bounds: {e}");
    }
    if let Err(e) = c.consumer_config("x", Some("g")).create::<BaseConsumer>() {
        panic!("librdkafka refuses the consumer at the bounds: {e}");
    }
    let low = KafkaConfig::from_url(
        "kafka://h?session_timeout=1ms&linger=0&delivery_timeout=1ms&connection_timeout=1ms",
    )
    .unwrap();
    if let Err(e) = low.producer_config("x", 1).create::<BaseProducer>() {
        panic!("librdkafka refuses the producer at the lower bounds: {e}");
    }
    if let Err(e) = low.consumer_config("x", Some("g")).create::<BaseConsumer>() {
        panic!("librdkafka refuses the consumer at the lower bounds: {e}");
    }
    // One past the bound is librdkafka's error, which KafkaConfig::from_url time now prevents.
    assert!(c
        .producer_config("x", 999_934_465)
        .create::<BaseProducer>()
        .is_err());
}

#[test]
fn bad_options_are_clear() {
    for (url, needle) in [
        (
            "kafka://h?partitions=0",
            "partitions=0: too small; use a whole number from 1 to",
        ),
        ("kafka://h?replication=0", "replication"),
        ("kafka://h?prefetch=0", "prefetch"),
        ("kafka://h?security.protocol=tls", "security.protocol"),
        ("kafka://h?sasl.mechanism=GSSAPI", "kafka.sasl.mechanism"),
        ("kafka://h?password=x", "without a username"),
        ("kafka://h:99999", "port"),
        ("kafka://h,,k", "empty broker"),
        ("kafka://h/path", "no path"),
        ("kafka://h?groups_topic=a%20b", "groups_topic"),
        ("kafka://h?kafka.=1", "kafka.<property>"),
        ("amqp://h", "kafka://"),
    ] {
        let e = match LayerConfig::from_url(url) {
            Ok(cfg) => KafkaConfig::from_layer_config(&cfg)
                .expect_err(url)
                .to_string(),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(needle), "{url}: {e}");
    }
}
