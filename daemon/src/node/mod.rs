//! The node agent (`causeway node`): runs on every node of a site and keeps,
//! on its node, one route per peer view CIDR towards the site's active
//! gateway, and nothing else.
//!
//! - [`config`]: the node's config file (pure parse).
//! - [`plan`]: pure functions: which gateway is active, what the routes
//!   and the nftables table should be.
//! - `agent`: the I/O: watches every gateway ([`crate::cluster::watch`]),
//!   reconciles routes (`proto 202`), the VXLAN device and the nftables
//!   table, reads the masquerade counter, serves `/metrics`.

mod agent;
pub mod config;
pub mod nft;
pub mod plan;

pub use agent::{GatewaysSeen, NodeStats, down, run};
pub use config::{Encapsulation, NodeConfig, parse};
