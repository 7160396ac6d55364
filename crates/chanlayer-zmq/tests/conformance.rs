//! The whole conformance suite in both modes: embedded (this process binds the publisher on
//! a Unix socket per test) and dedicated (a proxy thread per test, on free loopback ports).

mod common;

mod embedded {
    chanlayer_testkit::conformance_tests!(super::common::EmbeddedFactory);
}

mod dedicated {
    chanlayer_testkit::conformance_tests!(super::common::DedicatedFactory::default());
}
