//! Causeway daemon library: configuration, keys, the WireGuard data path and
//! the control socket. `main.rs` is a thin CLI over this crate.
//!
//! The data path ([`datapath`]) runs on two OS threads and moves packets in
//! batches; everything else (netlink, the control socket, boringtun's
//! timers) runs on a small tokio runtime.

pub mod candidates;
pub mod config;
pub mod core;
pub mod daemon;
mod datapath;
pub mod invite;
pub use causeway_common::keys;

pub mod notify;
pub mod observe;
pub mod packet;
pub mod views;
