//! Observing the running site: `causeway status` (the control socket),
//! `wg show` (the WireGuard UAPI socket), and Prometheus metrics with the
//! health endpoints.

mod prometheus;
mod status;
mod uapi;
mod unix;

pub(crate) use prometheus::serve as serve_metrics;
pub use prometheus::{MetricsServer, serve_rendezvous};
pub(crate) use status::serve as serve_control;
pub use status::{PeerStatus, Status, ViewStatus, query};
pub(crate) use uapi::serve as serve_uapi;
