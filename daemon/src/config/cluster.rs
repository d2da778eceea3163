//! The `[cluster]` table: the gateway's endpoint for the node agents
//! (`causeway node`), kept apart from the other sections so that it merges
//! cleanly with them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use causeway_common::problems::Problems;
use serde::Deserialize;

/// The VXLAN network identifier unless `[cluster] vxlan_vni` says otherwise.
pub const DEFAULT_VXLAN_VNI: u32 = 7901;
/// The VXLAN UDP port unless `[cluster] vxlan_port` says otherwise: not
/// 4789 or 8472, which CNIs (Calico, Flannel, Cilium) use for their own
/// VXLAN devices.
pub const DEFAULT_VXLAN_PORT: u16 = 4792;
/// The gateway's VXLAN interface name unless `[cluster] vxlan_interface`
/// says otherwise.
pub const DEFAULT_GATEWAY_VXLAN_INTERFACE: &str = "causeway-gw-vx";

/// The `[cluster]` table of a site config: where the gateway serves the
/// node agents, with which secret, and its VXLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Where the node agents connect (TCP).
    pub listen: SocketAddr,
    /// Absolute path of the shared cluster secret (≥ 16 bytes, whitespace
    /// around it ignored).
    pub secret_file: PathBuf,
    /// The address nodes route to, instead of the address they reached this
    /// gateway at (e.g. a VIP that follows the active gateway).
    pub route_via: Option<IpAddr>,
    /// VXLAN network identifier (1 to 16777215).
    pub vxlan_vni: u32,
    /// VXLAN UDP port.
    pub vxlan_port: u16,
    /// The gateway's VXLAN interface.
    pub vxlan_interface: String,
}

/// The `[cluster]` table as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    listen: Option<String>,
    secret_file: Option<PathBuf>,
    route_via: Option<String>,
    vxlan_vni: Option<i64>,
    vxlan_port: Option<i64>,
    vxlan_interface: Option<String>,
}

/// Checks the `[cluster]` table; every problem goes to `p`.
pub(super) fn cluster(p: &mut Problems<'_>, raw: RawCluster) -> Option<ClusterConfig> {
    let listen = match raw.listen {
        None => {
            p.add(
                "cluster.listen",
                "is missing: the address:port node agents connect to, e.g. \"0.0.0.0:7473\"",
            );
            None
        }
        Some(spec) => match spec.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Some(addr),
            _ => {
                p.add(
                    "cluster.listen",
                    format!("{spec:?} is not an address:port such as \"0.0.0.0:7473\""),
                );
                None
            }
        },
    };
    let secret_file = match raw.secret_file {
        Some(path) if path.is_absolute() => Some(path),
        Some(path) => {
            p.add(
                "cluster.secret_file",
                format!("{} is not an absolute path", path.display()),
            );
            None
        }
        None => {
            p.add(
                "cluster.secret_file",
                "is missing: the file holding the cluster secret shared with the node agents",
            );
            None
        }
    };
    let route_via = raw.route_via.and_then(|spec| match spec.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            p.add(
                "cluster.route_via",
                format!("{spec:?} is not an IP address"),
            );
            None
        }
    });
    let vxlan_vni = match raw.vxlan_vni {
        None => DEFAULT_VXLAN_VNI,
        Some(v) if (1..=0xff_ffff).contains(&v) => v as u32,
        Some(v) => {
            p.add("cluster.vxlan_vni", format!("{v} is not in 1 to 16777215"));
            DEFAULT_VXLAN_VNI
        }
    };
    let vxlan_port = match raw.vxlan_port {
        None => DEFAULT_VXLAN_PORT,
        Some(v) => match u16::try_from(v) {
            Ok(port) if port != 0 => port,
            _ => {
                p.add("cluster.vxlan_port", format!("{v} is not in 1 to 65535"));
                DEFAULT_VXLAN_PORT
            }
        },
    };
    let vxlan_interface = vxlan_interface(
        p,
        "cluster.vxlan_interface",
        raw.vxlan_interface,
        DEFAULT_GATEWAY_VXLAN_INTERFACE,
    );
    Some(ClusterConfig {
        listen: listen?,
        secret_file: secret_file?,
        route_via,
        vxlan_vni,
        vxlan_port,
        vxlan_interface,
    })
}

/// The shortest cluster secret accepted (bytes, surrounding whitespace not
/// counted): shorter ones are too easy to guess.
pub const MIN_SECRET_LEN: usize = 16;

/// Checks at load time that the secret file is readable and long enough,
/// so that a bad secret stops the daemon before it changes anything.
pub(super) fn check_secret(p: &mut Problems<'_>, cluster: &ClusterConfig) {
    match std::fs::read(&cluster.secret_file) {
        Ok(bytes) if bytes.trim_ascii().len() >= MIN_SECRET_LEN => {}
        Ok(_) => p.add(
            "cluster.secret_file",
            format!(
                "{} holds fewer than 16 bytes; put a long random secret there (e.g. `head -c 32 /dev/urandom | base64`)",
                cluster.secret_file.display()
            ),
        ),
        Err(e) => p.add(
            "cluster.secret_file",
            format!("cannot read {}: {e}", cluster.secret_file.display()),
        ),
    }
}

/// A VXLAN interface name from `field` (`default` when absent): 1 to 15 of
/// a-z, A-Z, 0-9, `-` and `_`; a problem is recorded otherwise.
pub fn vxlan_interface(
    p: &mut Problems<'_>,
    field: &str,
    value: Option<String>,
    default: &str,
) -> String {
    let name = value.unwrap_or_else(|| default.to_owned());
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        p.add(
            field,
            format!("{name:?} is not a valid interface name (1 to 15 of a-z, 0-9, - and _)"),
        );
    }
    name
}
