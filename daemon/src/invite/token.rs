//! The invite token's codec: [`Invite`], the facts a token carries, and
//! its one-line text form (see the [module doc](super) for the format).
//! Pure: no files, no network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use causeway_common::problems::valid_name;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{self, Config, Parsed};
use crate::keys::{self, PublicKey};
use crate::views::overlaps;

/// The version of the token format this release writes and reads.
pub const TOKEN_VERSION: u32 = 1;

/// What every token starts with, before its version and a `.`.
pub const TOKEN_PREFIX: &str = "cw";

/// The longest token read, in characters (whitespace not counted). A
/// typical token is 250 to 400 characters long.
pub const MAX_TOKEN_LEN: usize = 4096;

/// The broadest IPv4 pod CIDR a token may carry: a `/8`. Anything broader
/// would route a large part of the Internet into the tunnel.
pub const MIN_POD_PREFIX_V4: u8 = 8;

/// The broadest IPv6 pod CIDR a token may carry: a `/32`.
pub const MIN_POD_PREFIX_V6: u8 = 32;

/// Networks that are no site's pod network: a token's pod CIDR may not
/// overlap any of them.
pub const NOT_POD_NETWORKS: [(IpNet, &str); 10] = [
    (v4(0, 0, 0, 0, 8), "\"this network\""),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved and broadcast"),
    (v6(Ipv6Addr::UNSPECIFIED, 128), "unspecified"),
    (v6(Ipv6Addr::LOCALHOST, 128), "loopback"),
    (
        v6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96),
        "IPv4-mapped",
    ),
    (
        v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
        "link-local",
    ),
    (
        v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
        "multicast",
    ),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpNet {
    IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), len)
}

const fn v6(addr: Ipv6Addr, len: u8) -> IpNet {
    IpNet::new_assert(IpAddr::V6(addr), len)
}

/// What a site tells another one so that it can be added as a peer: the
/// content of an invite token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// The inviting site's name (`site.name`).
    pub site: String,
    /// Its WireGuard public key.
    pub public_key: PublicKey,
    /// Its exported networks (`site.pod_cidrs`), at least one.
    pub pod_cidrs: Vec<IpNet>,
    /// Where its WireGuard port can be reached, `host:port`; may be empty.
    pub endpoints: Vec<String>,
    /// The rendezvous servers it registers with.
    pub rendezvous: Vec<InviteRendezvous>,
}

/// A rendezvous server named in a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteRendezvous {
    /// Its QUIC address as the inviting site wrote it.
    pub address: String,
    /// Its public key.
    pub public_key: PublicKey,
    /// Its STUN address, when not the default (same host, port 3478).
    pub stun: Option<String>,
}

/// Why a token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The text does not start with `cw<version>.`.
    #[error(
        "this is not a Causeway invite token: it should start with \"{TOKEN_PREFIX}{TOKEN_VERSION}.\"; copy the whole line printed by `causeway invite`"
    )]
    NotAToken,
    /// A token of another version of the format.
    #[error(
        "this is a version {found} invite token, but this causeway reads version {TOKEN_VERSION}; make the token with the same Causeway release as this site"
    )]
    Version {
        /// The version the token says it is.
        found: u64,
    },
    /// Longer than [`MAX_TOKEN_LEN`]: no token `causeway invite` prints.
    #[error(
        "the invite token is {len} characters long, more than the {MAX_TOKEN_LEN} a token may have; copy only the line printed by `causeway invite`"
    )]
    TooLong {
        /// Its length, whitespace not counted.
        len: usize,
    },
    /// Not base64url, or not the JSON expected: cut short or altered.
    #[error(
        "the invite token is damaged or incomplete ({reason}); copy the whole line printed by `causeway invite`, from \"{TOKEN_PREFIX}{TOKEN_VERSION}.\" to its end"
    )]
    Damaged {
        /// What the decoder found wrong.
        reason: String,
    },
    /// It decodes, but one of its values is not valid.
    #[error(
        "the invite token holds an invalid {field}: {reason}; ask the other site for a new token"
    )]
    Invalid {
        /// The token field at fault.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The token as JSON. Field names follow the config file's keys.
#[derive(Serialize, Deserialize)]
struct Wire {
    v: u64,
    site: String,
    public_key: String,
    pod_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    endpoints: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rendezvous: Vec<WireRendezvous>,
}

#[derive(Serialize, Deserialize)]
struct WireRendezvous {
    address: String,
    public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stun: Option<String>,
}

impl Invite {
    /// The invite of the site `config` describes, whose public key is
    /// `public_key`: `endpoints` first, then `site.advertise_endpoints`,
    /// without repeats.
    pub fn of_site(config: &Config<Parsed>, public_key: PublicKey, endpoints: &[String]) -> Invite {
        let mut all: Vec<String> = Vec::new();
        let advertised = config
            .site
            .advertise_endpoints
            .iter()
            .map(SocketAddr::to_string);
        for endpoint in endpoints.iter().cloned().chain(advertised) {
            if !all.contains(&endpoint) {
                all.push(endpoint);
            }
        }
        let rendezvous = config
            .rendezvous
            .iter()
            .map(|r| {
                let default_stun = config::default_stun(&r.address);
                InviteRendezvous {
                    address: r.address.spec.clone(),
                    public_key: r.public_key,
                    stun: (r.stun.spec != default_stun).then(|| r.stun.spec.clone()),
                }
            })
            .collect();
        Invite {
            site: config.site.name.clone(),
            public_key,
            pod_cidrs: config.site.pod_cidrs.clone(),
            endpoints: all,
            rendezvous,
        }
    }

    /// The one-line token: `cw1.` and the base64url of the JSON.
    pub fn encode(&self) -> String {
        let wire = Wire {
            v: u64::from(TOKEN_VERSION),
            site: self.site.clone(),
            public_key: keys::encode_public(&self.public_key),
            pod_cidrs: self.pod_cidrs.iter().map(IpNet::to_string).collect(),
            endpoints: self.endpoints.clone(),
            rendezvous: self
                .rendezvous
                .iter()
                .map(|r| WireRendezvous {
                    address: r.address.clone(),
                    public_key: keys::encode_public(&r.public_key),
                    stun: r.stun.clone(),
                })
                .collect(),
        };
        // Strings and lists of strings always serialize.
        let json = serde_json::to_string(&wire).unwrap_or_default();
        format!(
            "{TOKEN_PREFIX}{TOKEN_VERSION}.{}",
            URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Reads a token; whitespace anywhere in it is ignored. Every value is
    /// checked as [`check`](Self::check) does; on any problem the error
    /// names the token field.
    pub fn decode(token: &str) -> Result<Invite, TokenError> {
        let token: String = token.chars().filter(|c| !c.is_whitespace()).collect();
        let len = token.chars().count();
        if len > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong { len });
        }
        let (head, body) = token.split_once('.').ok_or(TokenError::NotAToken)?;
        let version = head
            .strip_prefix(TOKEN_PREFIX)
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .ok_or(TokenError::NotAToken)?;
        let found = version.parse::<u64>().unwrap_or(u64::MAX);
        if found != u64::from(TOKEN_VERSION) {
            return Err(TokenError::Version { found });
        }
        let json = URL_SAFE_NO_PAD
            .decode(body.trim_end_matches('='))
            .map_err(|e| TokenError::Damaged {
                reason: format!("not base64url: {e}"),
            })?;
        let wire: Wire = serde_json::from_slice(&json).map_err(|e| TokenError::Damaged {
            reason: format!("not the expected JSON: {e}"),
        })?;
        if wire.v != u64::from(TOKEN_VERSION) {
            return Err(TokenError::Version { found: wire.v });
        }
        let invalid = |field: String, reason: String| TokenError::Invalid { field, reason };
        let public_key = keys::decode_public(&wire.public_key)
            .map_err(|e| invalid("public_key".into(), e.to_string()))?;
        let pod_cidrs = wire
            .pod_cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                config::parse_cidr(c).map_err(|why| invalid(format!("pod_cidrs[{i}]"), why))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rendezvous = wire
            .rendezvous
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let public_key = keys::decode_public(&r.public_key)
                    .map_err(|e| invalid(format!("rendezvous[{i}].public_key"), e.to_string()))?;
                Ok(InviteRendezvous {
                    address: r.address,
                    public_key,
                    stun: r.stun,
                })
            })
            .collect::<Result<Vec<_>, TokenError>>()?;
        let invite = Invite {
            site: wire.site,
            public_key,
            pod_cidrs,
            endpoints: wire.endpoints,
            rendezvous,
        };
        invite
            .check()
            .map_err(|Refusal { field, reason }| invalid(field, reason))?;
        Ok(invite)
    }

    /// Checks every value against the rules the config file applies, so
    /// that `join` can add the peer without any of them leaving its TOML
    /// string, and against the rules for what a peer may route here:
    ///
    /// - `site`: a peer name, `[a-z0-9-]{1,32}`;
    /// - `pod_cidrs`: at least one, none overlapping another, each at most
    ///   as broad as [`MIN_POD_PREFIX_V4`] / [`MIN_POD_PREFIX_V6`] (so not
    ///   the default route), none overlapping [`NOT_POD_NETWORKS`], each in
    ///   canonical form (no host bits set);
    /// - `endpoints`, and the `address` and `stun` of each rendezvous:
    ///   `host:port` as the config file takes it;
    /// - the encoded token at most [`MAX_TOKEN_LEN`] characters long.
    ///
    /// (Keys are checked when decoding: the type holds only valid ones.)
    /// `causeway invite` checks its own
    /// invite this way too, so that it never prints a token `join` refuses.
    pub fn check(&self) -> Result<(), Refusal> {
        let refuse = |field: String, reason: String| Err(Refusal { field, reason });
        if !valid_name(&self.site) {
            return refuse(
                "site".into(),
                format!(
                    "{} is not a valid site name (1 to 32 characters from a-z, 0-9 and '-')",
                    shown(&self.site)
                ),
            );
        }
        if self.pod_cidrs.is_empty() {
            return refuse("pod_cidrs".into(), "the list is empty".into());
        }
        for (i, net) in self.pod_cidrs.iter().enumerate() {
            if let Err(reason) = check_pod_cidr(net) {
                return refuse(format!("pod_cidrs[{i}]"), reason);
            }
            if let Some((k, earlier)) = self.pod_cidrs[..i]
                .iter()
                .enumerate()
                .find(|(_, earlier)| overlaps(earlier, net))
            {
                return refuse(
                    format!("pod_cidrs[{i}]"),
                    format!("{net} overlaps pod_cidrs[{k}] {earlier}"),
                );
            }
        }
        let endpoint = |field: String, spec: &str| match check_endpoint(spec) {
            Ok(()) => Ok(()),
            Err(why) => refuse(field, format!("{} {why}", shown(spec))),
        };
        for (i, spec) in self.endpoints.iter().enumerate() {
            endpoint(format!("endpoints[{i}]"), spec)?;
        }
        for (i, r) in self.rendezvous.iter().enumerate() {
            endpoint(format!("rendezvous[{i}].address"), &r.address)?;
            if let Some(stun) = &r.stun {
                endpoint(format!("rendezvous[{i}].stun"), stun)?;
            }
        }
        let len = self.encode().chars().count();
        if len > MAX_TOKEN_LEN {
            return refuse(
                "length".into(),
                format!(
                    "the token would be {len} characters long, more than {MAX_TOKEN_LEN}; list fewer pod_cidrs, endpoints or rendezvous"
                ),
            );
        }
        Ok(())
    }
}

/// Why [`Invite::check`] refused an invite: the token field at fault and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The token field, e.g. `pod_cidrs[1]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Whether `net` may be a pod network of a peer: in canonical form (no
/// host bits set, as the config file requires), not broader than a `/8`
/// (IPv4) or `/32` (IPv6), and overlapping none of [`NOT_POD_NETWORKS`].
fn check_pod_cidr(net: &IpNet) -> Result<(), String> {
    if *net != net.trunc() {
        return Err(format!(
            "{net} has host bits set; the network is {}",
            net.trunc()
        ));
    }
    let broadest = match net {
        IpNet::V4(_) => MIN_POD_PREFIX_V4,
        IpNet::V6(_) => MIN_POD_PREFIX_V6,
    };
    if net.prefix_len() == 0 {
        return Err(format!(
            "{net} is the default route: it would send all of this site's traffic into the tunnel; pod_cidrs must list only the site's own pod networks"
        ));
    }
    if net.prefix_len() < broadest {
        return Err(format!(
            "{net} is broader than /{broadest}: it would route a large part of the Internet into the tunnel; pod_cidrs must list the site's own pod networks, each /{MIN_POD_PREFIX_V4} or narrower (IPv6: /{MIN_POD_PREFIX_V6} or narrower)"
        ));
    }
    if let Some((special, what)) = NOT_POD_NETWORKS.iter().find(|(s, _)| overlaps(s, net)) {
        return Err(format!(
            "{net} overlaps {special} ({what}), which is no pod network"
        ));
    }
    Ok(())
}

/// A value from a token as an error message shows it: quoted, control
/// characters escaped, and cut after 64 characters.
fn shown(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        None => format!("{value:?}"),
        Some((end, _)) => format!(
            "{:?}… ({} characters)",
            &value[..end],
            value.chars().count()
        ),
    }
}

/// Checks `host:port` as the config file takes it: an IP literal (IPv6 in
/// brackets) or a DNS name, and a port from 1 to 65535. On error, says
/// what is wrong after the quoted endpoint.
pub(super) fn check_endpoint(spec: &str) -> Result<(), String> {
    config::parse_endpoint(spec).map(drop)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn tokens_round_trip_on_one_url_safe_line() {
        let invite = sample();
        let token = invite.encode();
        assert!(token.starts_with("cw1."), "{token}");
        assert!(
            token[4..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{token}"
        );
        assert!(token.len() < 600, "{} characters", token.len());
        assert_eq!(Invite::decode(&token).unwrap(), invite);

        // Whitespace (a wrapped line, a trailing newline) does not matter.
        let (a, b) = token.split_at(40);
        assert_eq!(
            Invite::decode(&format!("  {a}\n  {b}\r\n")).unwrap(),
            invite
        );

        // Nothing but the site is left out when empty.
        let bare = Invite {
            endpoints: Vec::new(),
            rendezvous: Vec::new(),
            ..invite
        };
        let token = bare.encode();
        let json = json_of(&token);
        let fields: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(fields, ["pod_cidrs", "public_key", "site", "v"]);
        assert_eq!(Invite::decode(&token).unwrap(), bare);
    }

    #[test]
    fn a_typical_token_is_short() {
        let mut invite = sample();
        invite.pod_cidrs.truncate(1);
        invite.endpoints.truncate(1);
        invite.rendezvous.truncate(1);
        let token = invite.encode();
        assert!(token.len() < 400, "{} characters: {token}", token.len());
    }

    #[test]
    fn garbage_is_not_a_token() {
        for text in [
            "", "hello", "cw1", "cw.abc", "cwx.abc", "xx1.abc", "cw-1.abc", "CW1.abc",
        ] {
            assert_eq!(Invite::decode(text), Err(TokenError::NotAToken), "{text:?}");
        }
        for text in ["cw1.!!!!", "cw1.a", "cw1.abc+/", "cw1.e30x"] {
            let err = Invite::decode(text).unwrap_err();
            assert!(
                matches!(err, TokenError::Damaged { .. }),
                "{text:?}: {err:?}"
            );
        }
        for json in [
            "not json",
            "{}",
            "[1]",
            r#"{"v":1}"#,
            r#"{"v":1,"site":"a","public_key":1,"pod_cidrs":[]}"#,
        ] {
            let err = Invite::decode(&token_of(json)).unwrap_err();
            assert!(matches!(err, TokenError::Damaged { .. }), "{json}: {err:?}");
            assert!(err.to_string().contains("copy the whole line"), "{err}");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let token = sample().encode();
        for len in 0..token.len() {
            let cut = &token[..len];
            assert!(Invite::decode(cut).is_err(), "{cut:?} was accepted");
        }
    }

    #[test]
    fn other_versions_are_refused_by_number() {
        let body = sample().encode()[4..].to_owned();
        let err = Invite::decode(&format!("cw2.{body}")).unwrap_err();
        assert_eq!(err, TokenError::Version { found: 2 });
        assert!(err.to_string().contains("version 2"), "{err}");
        assert!(err.to_string().contains("reads version 1"), "{err}");
        let err = Invite::decode("cw99999999999999999999999.abc").unwrap_err();
        assert!(matches!(err, TokenError::Version { .. }), "{err:?}");
        // The JSON disagreeing with the prefix.
        let json =
            format!(r#"{{"v":3,"site":"a","public_key":"{KEY_A}","pod_cidrs":["10.0.0.0/16"]}}"#);
        assert_eq!(
            Invite::decode(&token_of(&json)),
            Err(TokenError::Version { found: 3 })
        );
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            (
                r#""site":"","public_key":"KEY","pod_cidrs":["10.0.0.0/16"]"#,
                "invalid site",
            ),
            (
                r#""site":"a","public_key":"short","pod_cidrs":["10.0.0.0/16"]"#,
                "invalid public_key",
            ),
            (
                r#""site":"a","public_key":"KEY","pod_cidrs":[]"#,
                "invalid pod_cidrs",
            ),
            (
                r#""site":"a","public_key":"KEY","pod_cidrs":["10.0.0.0/33"]"#,
                "invalid pod_cidrs[0]",
            ),
            (
                r#""site":"a","public_key":"KEY","pod_cidrs":["10.0.0.0/16"],"endpoints":["x y:1"]"#,
                "invalid endpoints[0]",
            ),
            (
                r#""site":"a","public_key":"KEY","pod_cidrs":["10.0.0.0/16"],"rendezvous":[{"address":"r:7443","public_key":"x"}]"#,
                "invalid rendezvous[0].public_key",
            ),
            (
                r#""site":"a","public_key":"KEY","pod_cidrs":["10.0.0.0/16"],"rendezvous":[{"address":"r","public_key":"KEY"}]"#,
                "invalid rendezvous[0].address",
            ),
        ];
        for (fields, expected) in cases {
            let json = format!("{{\"v\":1,{}}}", fields.replace("KEY", KEY_A));
            let err = Invite::decode(&token_of(&json)).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
        // Unknown fields are for later releases: ignored.
        let json = format!(
            r#"{{"v":1,"site":"a","public_key":"{KEY_A}","pod_cidrs":["10.0.0.0/16"],"later":true}}"#
        );
        assert!(Invite::decode(&token_of(&json)).is_ok());
    }

    #[test]
    fn check_endpoint_takes_what_the_config_takes() {
        for ok in [
            "192.0.2.1:51820",
            "[2001:db8::1]:51820",
            "gw.example.com:51820",
            "gw:1",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "gw",
            "gw:0",
            "gw:65536",
            ":51820",
            "2001:db8::1:51820",
            "a b:1",
            "gw..x:1",
            "\"x\":1",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
