//! The file as written. Everything is optional and loosely typed so that
//! validation ([`super::parse`]), not the deserializer, reports missing and
//! malformed values, all of them at once; only unknown keys and values of
//! the wrong TOML type are refused here.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) site: Option<RawSite>,
    #[serde(default)]
    pub(super) peer: Vec<RawPeer>,
    #[serde(default)]
    pub(super) rendezvous: Vec<RawRendezvous>,
    pub(super) cluster: Option<super::cluster::RawCluster>,
    pub(super) failover: Option<RawFailover>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFailover {
    pub(super) election: Option<String>,
    pub(super) lease_name: Option<String>,
    pub(super) lease_namespace: Option<String>,
    pub(super) identity: Option<String>,
    pub(super) lease_duration_ms: Option<i64>,
    pub(super) renew_deadline_ms: Option<i64>,
    pub(super) retry_period_ms: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRendezvous {
    pub(super) address: Option<String>,
    pub(super) public_key: Option<String>,
    pub(super) stun: Option<String>,
    pub(super) tcp: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSite {
    pub(super) name: Option<String>,
    pub(super) private_key_file: Option<PathBuf>,
    pub(super) interface: Option<String>,
    pub(super) listen_port: Option<i64>,
    pub(super) pod_cidrs: Option<Vec<String>>,
    pub(super) remap_pool: Option<Vec<String>>,
    pub(super) reserved_cidrs: Option<Vec<String>>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) mtu: Option<i64>,
    pub(super) control_socket: Option<PathBuf>,
    pub(super) uapi_socket: Option<PathBuf>,
    pub(super) advertise_endpoints: Option<Vec<String>>,
    pub(super) stun_servers: Option<Vec<String>>,
    pub(super) port_mapping: Option<bool>,
    pub(super) metrics_listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) name: Option<String>,
    pub(super) public_key: Option<String>,
    pub(super) cidrs: Option<Vec<String>>,
    pub(super) endpoint: Option<String>,
    pub(super) persistent_keepalive: Option<i64>,
    #[serde(default)]
    pub(super) allow: Vec<RawAllow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAllow {
    pub(super) cidr: Option<String>,
    pub(super) proto: Option<String>,
    // A string ("443", "8000-8080") or, for a single port, an integer.
    pub(super) ports: Option<toml::Value>,
}
