//! The rendezvous configuration file (TOML).
//!
//! [`ServerConfig::parse`] is a pure function of the text and reports
//! every problem at once; [`ServerConfig::load`] reads the file first.
//! The private key file is read (or created) when the server starts. The
//! format is documented in docs/rendezvous.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use x25519_dalek::{PublicKey, StaticSecret};

use causeway_common::keys::{self, KeyError};
pub use causeway_common::problems::ConfigErrors;
use causeway_common::problems::{Problems, valid_name};

/// Where the rendezvous' private key lives unless `private_key_file` says otherwise.
pub const DEFAULT_PRIVATE_KEY_FILE: &str = "/var/lib/causeway/rendezvous.key";
/// The QUIC address unless `listen` says otherwise (dual-stack where the
/// system allows it, else IPv4 only).
pub const DEFAULT_LISTEN: &str = "[::]:7443";
/// The STUN address unless `stun_listen` says otherwise.
pub const DEFAULT_STUN_LISTEN: &str = "[::]:3478";

/// A validated rendezvous configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Absolute path of the rendezvous' private key (`causeway genkey`
    /// format); created with mode 0600 if missing.
    pub private_key_file: PathBuf,
    /// UDP address of the QUIC server that sites dial.
    pub listen: SocketAddr,
    /// UDP address of the STUN responder.
    pub stun_listen: SocketAddr,
    /// Which UDP ports the relay ports of pairs are bound on.
    pub relay_ports: RelayPorts,
    /// TCP address of the TLS listener for sites that can send no UDP;
    /// `None` (the default, `"off"`): none.
    pub tcp_listen: Option<SocketAddr>,
    /// The sites this rendezvous serves, in file order (non-empty, names and
    /// keys unique).
    pub sites: Vec<SiteEntry>,
}

/// Where the UDP relay ports of pairs come from (`relay_ports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayPorts {
    /// Any free port the kernel picks (its ephemeral range).
    #[default]
    Any,
    /// A free port in `low..=high` (for a firewall that opens a range).
    Range(u16, u16),
    /// None: pairs relay over QUIC only.
    Off,
}

/// A `[[site]]` table: a site allowed to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteEntry {
    /// The site's name, `[a-z0-9-]{1,32}`, used in logs and counters.
    pub name: String,
    /// The site's WireGuard public key.
    pub public_key: PublicKey,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    private_key_file: Option<PathBuf>,
    listen: Option<String>,
    stun_listen: Option<String>,
    relay_ports: Option<String>,
    tcp_listen: Option<String>,
    #[serde(default)]
    site: Vec<RawSite>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: Option<String>,
    public_key: Option<String>,
}

impl ServerConfig {
    /// Parses and validates a configuration without touching files or the
    /// network; `origin` names the file in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigErrors> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigErrors::toml(origin, text, &e))?;
        let mut p = Problems::new(origin);
        let private_key_file = raw
            .private_key_file
            .unwrap_or_else(|| DEFAULT_PRIVATE_KEY_FILE.into());
        if !private_key_file.is_absolute() {
            p.add(
                "private_key_file",
                format!(
                    "{:?} is not an absolute path; write the full path",
                    private_key_file.display().to_string()
                ),
            );
        }
        let listen = address(
            &mut p,
            "listen",
            raw.listen,
            DEFAULT_LISTEN,
            "\"[::]:7443\"",
        );
        let stun_listen = address(
            &mut p,
            "stun_listen",
            raw.stun_listen,
            DEFAULT_STUN_LISTEN,
            "\"[::]:3478\"",
        );
        match (listen, stun_listen) {
            (Some(l), Some(s))
                if l.port() == s.port()
                    && (l.ip() == s.ip() || l.ip().is_unspecified() || s.ip().is_unspecified()) =>
            {
                p.add(
                    "stun_listen",
                    format!(
                        "{s} clashes with listen = \"{l}\"; QUIC and STUN need different UDP ports"
                    ),
                );
            }
            _ => {}
        }

        let relay_ports = match raw.relay_ports.as_deref().map(relay_ports) {
            None => RelayPorts::Any,
            Some(Ok(ports)) => ports,
            Some(Err(why)) => {
                p.add("relay_ports", why);
                RelayPorts::Any
            }
        };

        let tcp_listen = match raw.tcp_listen.as_deref() {
            None | Some("off") => None,
            Some(text) => address(
                &mut p,
                "tcp_listen",
                Some(text.to_owned()),
                "",
                "\"[::]:443\" (or \"off\")",
            ),
        };

        if raw.site.is_empty() {
            p.add(
                "site",
                "no [[site]] tables; list every site this rendezvous serves, with its name and public key",
            );
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut keys_seen: HashMap<[u8; 32], usize> = HashMap::new();
        let mut sites = Vec::new();
        for (i, site) in raw.site.into_iter().enumerate() {
            let label = format!("site[{i}]");
            let name = match site.name {
                None => {
                    p.add(
                        format!("{label}: name"),
                        "missing; give it a name of 1 to 32 characters from a-z, 0-9 and '-'",
                    );
                    None
                }
                Some(name) if !valid_name(&name) => {
                    p.add(
                        format!("{label}: name"),
                        format!("{name:?} is not a valid name; use 1 to 32 characters from a-z, 0-9 and '-'"),
                    );
                    None
                }
                Some(name) => {
                    if let Some(first) = names.insert(name.clone(), i) {
                        p.add(
                            format!("{label}: name"),
                            format!("{name:?} is already the name of site[{first}]; names must be unique"),
                        );
                    }
                    Some(name)
                }
            };
            let public_key = match site.public_key.as_deref().map(keys::decode_public) {
                None => {
                    p.add(
                        format!("{label}: public_key"),
                        "missing; write the site's WireGuard public key (`causeway pubkey` on the site)",
                    );
                    None
                }
                Some(Err(why)) => {
                    p.add(format!("{label}: public_key"), why.to_string());
                    None
                }
                Some(Ok(key)) if !contributory(&key) => {
                    p.add(
                        format!("{label}: public_key"),
                        "is a low-order point, not a real key; write the site's WireGuard public key",
                    );
                    None
                }
                Some(Ok(key)) => {
                    if let Some(first) = keys_seen.insert(key.to_bytes(), i) {
                        p.add(
                            format!("{label}: public_key"),
                            format!(
                                "is already the key of site[{first}]; each site has its own key"
                            ),
                        );
                    }
                    Some(key)
                }
            };
            if let (Some(name), Some(public_key)) = (name, public_key) {
                sites.push(SiteEntry { name, public_key });
            }
        }
        p.finish()?;
        Ok(Self {
            private_key_file,
            listen: listen.unwrap_or_else(|| default_addr(DEFAULT_LISTEN)),
            stun_listen: stun_listen.unwrap_or_else(|| default_addr(DEFAULT_STUN_LISTEN)),
            relay_ports,
            tcp_listen,
            sites,
        })
    }

    /// Reads and parses the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::one(&origin, format!("cannot read the config file: {e}")))?;
        Self::parse(&text, &origin)
    }

    /// Reads the private key file, creating it (mode 0600) if it is missing.
    pub fn load_private_key(&self) -> Result<StaticSecret, KeyError> {
        keys::load_or_create_private_key(&self.private_key_file)
    }
}

/// `"any"`, `"off"` or `"low-high"`.
fn relay_ports(text: &str) -> Result<RelayPorts, String> {
    let range = |t: &str| {
        let (low, high) = t.split_once('-')?;
        let (low, high) = (
            low.trim().parse::<u16>().ok()?,
            high.trim().parse::<u16>().ok()?,
        );
        (low > 0 && low <= high).then_some(RelayPorts::Range(low, high))
    };
    match text {
        "any" => Ok(RelayPorts::Any),
        "off" => Ok(RelayPorts::Off),
        t => range(t).ok_or_else(|| {
            format!("{t:?} is not \"any\", \"off\" or a port range such as \"40000-40999\"")
        }),
    }
}

fn default_addr(text: &str) -> SocketAddr {
    text.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn address(
    p: &mut Problems<'_>,
    field: &str,
    value: Option<String>,
    default: &str,
    example: &str,
) -> Option<SocketAddr> {
    let text = value.unwrap_or_else(|| default.to_owned());
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Some(addr),
        Ok(_) => {
            p.add(
                field,
                format!("{text:?} has port 0; sites need a fixed port, e.g. {example}"),
            );
            None
        }
        Err(_) => {
            p.add(
                field,
                format!("{text:?} is not an address:port such as {example}"),
            );
            None
        }
    }
}

/// Whether a public key gives a contributory X25519 result (not a
/// low-order point).
fn contributory(key: &PublicKey) -> bool {
    StaticSecret::from([0x5a; 32])
        .diffie_hellman(key)
        .was_contributory()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk=";
    const KEY_B: &str = "ZkgvCW+DIoRG24ZST7MmKM5j/X9m/LO8XA0qLN0Fxm0=";

    #[test]
    fn minimal_config_gets_defaults() {
        let text = format!("[[site]]\nname = \"pharma\"\npublic_key = \"{KEY_A}\"\n");
        let c = ServerConfig::parse(&text, "r.toml").unwrap();
        assert_eq!(c.private_key_file, PathBuf::from(DEFAULT_PRIVATE_KEY_FILE));
        assert_eq!(c.relay_ports, RelayPorts::Any);
        assert_eq!(c.listen, "[::]:7443".parse().unwrap());
        assert_eq!(c.stun_listen, "[::]:3478".parse().unwrap());
        assert_eq!(c.sites.len(), 1);
        assert_eq!(c.sites[0].name, "pharma");
        assert_eq!(c.sites[0].public_key, keys::decode_public(KEY_A).unwrap());
    }

    #[test]
    fn full_config() {
        let text = format!(
            r#"
private_key_file = "/etc/causeway/rendezvous.key"
listen = "0.0.0.0:443"
stun_listen = "0.0.0.0:3478"

[[site]]
name = "pharma"
public_key = "{KEY_A}"

[[site]]
name = "hospital"
public_key = "{KEY_B}"
"#
        );
        let c = ServerConfig::parse(&text, "r.toml").unwrap();
        assert_eq!(c.listen, "0.0.0.0:443".parse().unwrap());
        assert_eq!(
            c.sites.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["pharma", "hospital"]
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text =
            format!("lisen = \"0.0.0.0:1\"\n[[site]]\nname = \"a\"\npublic_key = \"{KEY_A}\"\n");
        let err = ServerConfig::parse(&text, "r.toml").unwrap_err();
        assert_eq!(err.problems().len(), 1);
        assert!(err.problems()[0].contains("unknown field `lisen`"), "{err}");
        assert!(err.problems()[0].starts_with("r.toml: line 1"), "{err}");
        let text = format!("[[site]]\nname = \"a\"\npubkey = \"{KEY_A}\"\n");
        let err = ServerConfig::parse(&text, "r.toml").unwrap_err();
        assert!(err.to_string().contains("unknown field `pubkey`"), "{err}");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = format!(
            r#"
private_key_file = "relative.key"
listen = "nonsense"
stun_listen = "0.0.0.0:0"

[[site]]
name = "Pharma"
public_key = "{KEY_A}"

[[site]]
name = "b"
public_key = "{KEY_A}"

[[site]]
name = "b"

[[site]]
name = "c"
public_key = "short"

[[site]]
name = "d"
public_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
"#
        );
        let err = ServerConfig::parse(&text, "r.toml").unwrap_err();
        let expected = [
            "r.toml: private_key_file: \"relative.key\" is not an absolute path",
            "r.toml: listen: \"nonsense\" is not an address:port",
            "r.toml: stun_listen: \"0.0.0.0:0\" has port 0",
            "r.toml: site[0]: name: \"Pharma\" is not a valid name",
            "r.toml: site[1]: public_key: is already the key of site[0]",
            "r.toml: site[2]: name: \"b\" is already the name of site[1]",
            "r.toml: site[2]: public_key: missing",
            "r.toml: site[3]: public_key: public key is 5 characters long",
            "r.toml: site[4]: public_key: is a low-order point",
        ];
        assert_eq!(err.problems().len(), expected.len(), "{err}");
        for (got, want) in err.problems().iter().zip(expected) {
            assert!(got.starts_with(want), "{got}\n  should start with\n{want}");
        }
    }

    #[test]
    fn empty_and_clashing() {
        let err = ServerConfig::parse("", "r.toml").unwrap_err();
        assert!(err.to_string().contains("no [[site]] tables"), "{err}");
        let text =
            format!("listen = \"[::]:3478\"\n[[site]]\nname = \"a\"\npublic_key = \"{KEY_A}\"\n");
        let err = ServerConfig::parse(&text, "r.toml").unwrap_err();
        assert!(
            err.to_string().contains("stun_listen: [::]:3478 clashes"),
            "{err}"
        );
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.toml");
        let err = ServerConfig::load(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        let path = dir.path().join("r.toml");
        let key_file = dir.path().join("k/rendezvous.key");
        std::fs::write(
            &path,
            format!(
                "private_key_file = {:?}\n[[site]]\nname = \"a\"\npublic_key = \"{KEY_A}\"\n",
                key_file.display().to_string()
            ),
        )
        .unwrap();
        let c = ServerConfig::load(&path).unwrap();
        let k1 = c.load_private_key().unwrap();
        let k2 = c.load_private_key().unwrap();
        assert_eq!(k1.to_bytes(), k2.to_bytes());
    }

    #[test]
    fn relay_ports_are_any_off_or_a_range() {
        let with = |v: &str| {
            let text =
                format!("relay_ports = {v:?}\n[[site]]\nname = \"a\"\npublic_key = \"{KEY_A}\"\n");
            ServerConfig::parse(&text, "r.toml").map(|c| c.relay_ports)
        };
        assert_eq!(with("off").unwrap(), RelayPorts::Off);
        assert_eq!(with("any").unwrap(), RelayPorts::Any);
        assert_eq!(
            with("40000-40999").unwrap(),
            RelayPorts::Range(40000, 40999)
        );
        for bad in ["40999-40000", "0-10", "40000", "on", "1-70000"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.contains("relay_ports") && e.contains("port range"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn tcp_listen_is_off_unless_given_an_address() {
        let with = |line: &str| {
            let text = format!("{line}\n[[site]]\nname = \"a\"\npublic_key = \"{KEY_A}\"\n");
            ServerConfig::parse(&text, "r.toml").map(|c| c.tcp_listen)
        };
        assert_eq!(with("").unwrap(), None);
        assert_eq!(with("tcp_listen = \"off\"").unwrap(), None);
        assert_eq!(
            with("tcp_listen = \"[::]:443\"").unwrap(),
            Some("[::]:443".parse().unwrap())
        );
        for bad in ["443", "0.0.0.0:0", "on"] {
            let e = with(&format!("tcp_listen = {bad:?}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("tcp_listen") && e.contains("443"), "{bad}: {e}");
        }
    }
}
