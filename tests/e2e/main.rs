#![allow(unreachable_pub)]
//! End-to-end tests: the real `causeway` binary in real network namespaces
//! (built by causeway-testbed). They need root; every lab is torn down when
//! its test ends, also on failure.

mod common;

mod cli;
mod cluster;
mod failover;
mod failover_kubernetes;
mod garbage;
mod image;
mod interop;
mod invite;
mod mesh;
mod metrics;
mod nat;
mod reload;
mod remap;
mod rendezvous_metrics;
mod restart;
mod status;
mod traffic;
mod uapi;
