//! The invite token's codec: [`Invite`], the facts a token carries, and
//! its one-line text form (see the [module doc](super) for the format).
//! Pure: no files, no network.

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{self, Config, Parsed};
use crate::keys::{self, PublicKey};

/// The version of the token format this release writes and reads.
pub const TOKEN_VERSION: u32 = 1;

/// What every token starts with, before its version and a `.`.
pub const TOKEN_PREFIX: &str = "cw";

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

    /// Reads a token; whitespace anywhere in it is ignored.
    pub fn decode(token: &str) -> Result<Invite, TokenError> {
        let token: String = token.chars().filter(|c| !c.is_whitespace()).collect();
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
        let invalid = |field: &str, reason: String| TokenError::Invalid {
            field: field.into(),
            reason,
        };
        if wire.site.is_empty() {
            return Err(invalid("site", "the site name is empty".into()));
        }
        let public_key = keys::decode_public(&wire.public_key)
            .map_err(|e| invalid("public_key", e.to_string()))?;
        if wire.pod_cidrs.is_empty() {
            return Err(invalid("pod_cidrs", "the list is empty".into()));
        }
        let pod_cidrs = wire
            .pod_cidrs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.parse::<IpNet>().map_err(|_| {
                    invalid(&format!("pod_cidrs[{i}]"), format!("{c:?} is not a CIDR"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, endpoint) in wire.endpoints.iter().enumerate() {
            check_endpoint(endpoint).map_err(|why| {
                invalid(&format!("endpoints[{i}]"), format!("{endpoint:?} {why}"))
            })?;
        }
        let rendezvous = wire
            .rendezvous
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                check_endpoint(&r.address).map_err(|why| {
                    invalid(
                        &format!("rendezvous[{i}].address"),
                        format!("{:?} {why}", r.address),
                    )
                })?;
                if let Some(stun) = &r.stun {
                    check_endpoint(stun).map_err(|why| {
                        invalid(&format!("rendezvous[{i}].stun"), format!("{stun:?} {why}"))
                    })?;
                }
                let public_key = keys::decode_public(&r.public_key)
                    .map_err(|e| invalid(&format!("rendezvous[{i}].public_key"), e.to_string()))?;
                Ok(InviteRendezvous {
                    address: r.address,
                    public_key,
                    stun: r.stun,
                })
            })
            .collect::<Result<Vec<_>, TokenError>>()?;
        Ok(Invite {
            site: wire.site,
            public_key,
            pod_cidrs,
            endpoints: wire.endpoints,
            rendezvous,
        })
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
