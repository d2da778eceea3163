//! Who is the active gateway among replicas of one site: a Kubernetes
//! `coordination.k8s.io/v1` Lease (docs/failover-kubernetes.md).
//!
//! - [`lease`]: the election as a pure state machine (no I/O, no clock),
//!   client-go's rules, tested on its own against a simulated store;
//! - [`kubernetes`]: the thin adapter that drives it against the API server
//!   (in-cluster config, GET/POST/PUT of the Lease over HTTPS) and hands
//!   every role change to a callback;
//! - `fake_api_server` (hidden): a **simulated** API server (Leases only)
//!   for the election's unit tests and the end-to-end failover test; not
//!   used by the daemon.
//!
//! It depends on nothing else in the crate: the daemon feeds it settings
//! and consumes the [`Role`].

#[doc(hidden)]
pub mod fake_api_server;
pub mod kubernetes;
pub mod lease;

pub use kubernetes::{ApiServer, ElectionError, InClusterError, LeaseParams, run};
pub use lease::{Role, Timing};
