//! Causeway daemon library; `main.rs` is a thin CLI over it.
//!
//! In layers, each using only the ones below (docs/ARCHITECTURE.md;
//! `tests/layers.rs` checks it): [`packet`] (pure packet operations),
//! [`views`], [`config`] (raw → parsed → loaded), [`core`] (the site core,
//! no I/O) and [`invite`], `datapath` (the threads and tasks that move
//! bytes and time in and out of the core), [`observe`] (status, metrics,
//! `wg show`), and [`daemon`] (bring-up, reload, teardown). [`cluster`]
//! (the gateway's endpoint for node agents) sits beside [`core`];
//! [`node`] (the node agent, `causeway node`) beside [`daemon`].
//! [`election`] (who is the active gateway: a Kubernetes Lease) uses
//! nothing of the crate.

pub mod candidates;
pub mod cluster;
pub mod config;
pub mod core;
pub mod daemon;
mod datapath;
pub mod election;
pub mod invite;
pub use causeway_common::keys;

pub mod node;
pub mod notify;
pub mod observe;
pub mod packet;
pub mod views;
