//! The whole conformance suite against a real RabbitMQ (see `common::broker_url`).

mod common;

chanlayer_testkit::conformance_tests!(common::AmqpFactory);
