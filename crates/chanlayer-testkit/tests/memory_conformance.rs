//! The whole conformance suite against the in-memory backend.

chanlayer_testkit::conformance_tests!(chanlayer_testkit::MemoryFactory);
