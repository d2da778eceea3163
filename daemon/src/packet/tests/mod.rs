//! Tests of the packet module: a test-only builder and verifier
//! (independent of the code under test), unit tests and property tests.

mod build;
mod props;
mod unit;
