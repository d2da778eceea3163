//! The node agent's config file (`causeway node --config node.toml`):
//! parsed by a pure function that reports every problem at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use causeway_common::problems::{ConfigErrors, Problems};
use serde::Deserialize;

/// The node's VXLAN interface unless `vxlan_interface` says otherwise.
pub const DEFAULT_NODE_VXLAN_INTERFACE: &str = "causeway-vx";

/// How the node reaches the active gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encapsulation {
    /// Direct when the gateway's address is on a subnet of this node
    /// (same L2 segment), else VXLAN.
    Auto,
    /// Always a plain route `via` the gateway's address.
    Direct,
    /// Always through a VXLAN device to the gateway.
    Vxlan,
}

/// The node agent's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The gateways' cluster endpoints as written: `address:port` or
    /// `host:port` (a name resolving to every gateway, re-resolved every
    /// 30 s).
    pub gateways: Vec<String>,
    /// Absolute path of the shared cluster secret.
    pub secret_file: PathBuf,
    /// How to reach the active gateway.
    pub encapsulation: Encapsulation,
    /// The node's VXLAN interface name.
    pub vxlan_interface: String,
    /// The source address for traffic this host originates towards the
    /// views (IPv4); `None`: the first address of this host inside the
    /// site's pod CIDRs.
    pub host_snat_v4: Option<Ipv4Addr>,
    /// The same for IPv6.
    pub host_snat_v6: Option<Ipv6Addr>,
    /// Where `/metrics` and `/healthz` are served; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNode {
    gateways: Option<Vec<String>>,
    secret_file: Option<PathBuf>,
    encapsulation: Option<String>,
    vxlan_interface: Option<String>,
    host_snat: Option<Vec<String>>,
    metrics_listen: Option<String>,
}

/// Parses a node config; `origin` names the file in messages.
pub fn parse(text: &str, origin: &str) -> Result<NodeConfig, ConfigErrors> {
    let raw: RawNode = toml::from_str(text).map_err(|e| ConfigErrors::toml(origin, text, &e))?;
    let mut p = Problems::new(origin);
    let gateways = raw.gateways.unwrap_or_default();
    if gateways.is_empty() {
        p.add(
            "gateways",
            "is missing or empty: list the gateways' [cluster] listen addresses, e.g. [\"10.0.0.5:7473\"] or a name resolving to every gateway [\"causeway-gateway.causeway-system.svc.cluster.local:7473\"]",
        );
    }
    for (i, g) in gateways.iter().enumerate() {
        let port = g.rsplit_once(':').map(|(_, port)| port.parse::<u16>());
        if !matches!(port, Some(Ok(p)) if p != 0) {
            p.add(
                format!("gateways[{i}]"),
                format!("{g:?} is not host:port or address:port"),
            );
        }
    }
    let secret_file = match raw.secret_file {
        Some(path) if path.is_absolute() => path,
        Some(path) => {
            p.add(
                "secret_file",
                format!("{} is not an absolute path", path.display()),
            );
            path
        }
        None => {
            p.add("secret_file", "is missing: the file holding the cluster secret (the gateways' [cluster] secret_file)");
            PathBuf::new()
        }
    };
    let encapsulation = match raw.encapsulation.as_deref() {
        None | Some("auto") => Encapsulation::Auto,
        Some("direct") => Encapsulation::Direct,
        Some("vxlan") => Encapsulation::Vxlan,
        Some(other) => {
            p.add(
                "encapsulation",
                format!("{other:?} is not one of \"auto\", \"direct\", \"vxlan\""),
            );
            Encapsulation::Auto
        }
    };
    let vxlan_interface = crate::config::vxlan_interface(
        &mut p,
        "vxlan_interface",
        raw.vxlan_interface,
        DEFAULT_NODE_VXLAN_INTERFACE,
    );
    let (mut host_snat_v4, mut host_snat_v6) = (None, None);
    for (i, spec) in raw.host_snat.unwrap_or_default().iter().enumerate() {
        match spec.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if host_snat_v4.is_none() => host_snat_v4 = Some(a),
            Ok(IpAddr::V6(a)) if host_snat_v6.is_none() => host_snat_v6 = Some(a),
            Ok(_) => p.add(
                format!("host_snat[{i}]"),
                "at most one IPv4 and one IPv6 address",
            ),
            Err(_) => p.add(
                format!("host_snat[{i}]"),
                format!("{spec:?} is not an IP address"),
            ),
        }
    }
    let metrics_listen = raw.metrics_listen.and_then(|spec| match spec.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            p.add(
                "metrics_listen",
                format!("{spec:?} is not an address:port such as \"127.0.0.1:9470\""),
            );
            None
        }
    });
    p.finish()?;
    Ok(NodeConfig {
        gateways,
        secret_file,
        encapsulation,
        vxlan_interface,
        host_snat_v4,
        host_snat_v6,
        metrics_listen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_and_full() {
        let c = parse(
            "gateways = [\"10.0.0.5:7473\"]\nsecret_file = \"/etc/causeway-cluster/secret\"\n",
            "node.toml",
        )
        .expect("valid");
        assert_eq!(c.encapsulation, Encapsulation::Auto);
        assert_eq!(c.vxlan_interface, DEFAULT_NODE_VXLAN_INTERFACE);
        assert_eq!(c.host_snat_v4, None);
        let c = parse(
            r#"gateways = ["gw.example:7473", "10.0.0.6:7473"]
secret_file = "/s"
encapsulation = "vxlan"
vxlan_interface = "cw-vx"
host_snat = ["10.244.1.1", "fd00::1"]
metrics_listen = "127.0.0.1:9470"
"#,
            "node.toml",
        )
        .expect("valid");
        assert_eq!(c.encapsulation, Encapsulation::Vxlan);
        assert_eq!(c.host_snat_v4, Some(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(c.host_snat_v6, Some("fd00::1".parse().expect("ip")));
    }

    #[test]
    fn every_problem_at_once() {
        let e = parse(
            "gateways = [\"nope\"]\nsecret_file = \"rel\"\nencapsulation = \"gre\"\nhost_snat = [\"x\"]\nvxlan_interface = \"much-too-long-a-name\"\n",
            "node.toml",
        )
        .expect_err("invalid");
        let text = e.to_string();
        for field in [
            "gateways[0]",
            "secret_file",
            "encapsulation",
            "host_snat[0]",
            "vxlan_interface",
        ] {
            assert!(text.contains(field), "{field} not reported in {text}");
        }
        assert!(parse("gateways = []\n", "node.toml").is_err());
        assert!(parse("unknown = 1\n", "node.toml").is_err());
    }
}
