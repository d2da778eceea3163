//! NAT traversal for Causeway.
//!
//! Not built yet: sites currently need a static `endpoint` for each peer.
//! This crate will hold the sans-IO STUN codec, candidate gathering, path
//! selection and the rendezvous protocol (see docs/ARCHITECTURE.md).
