//! The whole conformance suite against a real Kafka-protocol broker (see
//! `common::bootstrap`).

mod common;

chanlayer_testkit::conformance_tests!(common::KafkaFactory);
