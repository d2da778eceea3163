//! Peering two sites without editing their files by hand: `causeway invite`
//! and `causeway join`.
//!
//! # The invite token
//!
//! One line of text: `cw1.` followed by the unpadded base64url (RFC 4648 §5)
//! of a compact JSON object. `1` is the token version, repeated inside the
//! JSON as `v`; a token of another version is refused with a message saying
//! so. The object holds only public facts about the inviting site:
//!
//! ```json
//! {"v":1,"site":"pharma","public_key":"<wg pubkey>","pod_cidrs":["10.0.0.0/16"],
//!  "endpoints":["203.0.113.7:51820"],
//!  "rendezvous":[{"address":"rendezvous.example.net:7443","public_key":"<key>"}]}
//! ```
//!
//! - `endpoints`: where the site's WireGuard port can be reached: the
//!   `--endpoint`s given to `causeway invite`, then `site.advertise_endpoints`.
//!   Left out when there are none (a site behind NAT is found through a
//!   rendezvous instead).
//! - `rendezvous`: every `[[rendezvous]]` of the site, with its address as
//!   written and its pinned public key; `stun` only when it is not the
//!   default (the address' host, port 3478). Left out when there are none.
//!
//! No private key, file path or local setting is ever part of a token: it
//! can be sent over chat or e-mail. It is not secret, but it is not signed
//! either: whoever joins it trusts the channel it came through to carry the
//! right public key (the join output repeats it, to compare). Unknown JSON
//! fields are ignored, so that later releases can add optional ones
//! without a new version. A typical token is 250 to 400 characters long;
//! whitespace inside it (a line broken by a mail client) is ignored.
//!
//! # Join
//!
//! [`join`] checks the token (not damaged, of this version, not this
//! site's own: same public key), refuses a peer whose public key or name
//! the file already has (naming that peer), then appends to the file, as
//! text so that the operator's comments and layout stay:
//!
//! - a `[[peer]]` table: `name` (the token's site name, or `--name`),
//!   `public_key`, `cidrs` (the token's `pod_cidrs`, which may overlap ours:
//!   views remap them) and `endpoint` (the first of the token's endpoints,
//!   if any);
//! - one `[[rendezvous]]` table per rendezvous of the token whose public
//!   key the file does not pin yet.
//!
//! Appending at the end is always safe in TOML: a `[[peer.allow]]` written
//! before stays with its own peer, and nothing of the operator's can attach
//! to the new tables. The new text is validated with [`config::parse`] and
//! the views the new peer would get are computed from `views.json` (read,
//! never written) before anything is written; on any problem the file is
//! left untouched and every problem reported. The file is then replaced
//! atomically (a temporary file in the same directory, then a rename,
//! keeping its mode and owner; a symbolic link is followed and its target
//! replaced), and only if it did not change while `join` ran.
//!
//! Neither command resolves host names or writes `views.json`: they can
//! run while the daemon runs, which picks the new peer up when it reloads
//! its configuration (SIGHUP or a change of the file), or, when a
//! `[[rendezvous]]` was added too, when it restarts: a reload that changes
//! the rendezvous is refused. The report says which applies.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use causeway_common::fs::atomic_replace_owned;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::config::{self, Config, ConfigErrors, Parsed, PeerConfig};
use crate::keys::{self, KeyError, PublicKey};
use crate::packet::View;
use crate::views::{self, Persisted};

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

/// Why `causeway invite` printed no token.
#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    /// The config file could not be read.
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The config file has problems (one per line).
    #[error("{0}")]
    Config(ConfigErrors),
    /// The private key could not be read or created.
    #[error("{}: site.private_key_file: {source}", path.display())]
    Key {
        /// The config file.
        path: PathBuf,
        /// What went wrong with the key.
        source: KeyError,
    },
    /// An `--endpoint` is not `host:port`.
    #[error("--endpoint {spec:?} {reason}")]
    Endpoint {
        /// The endpoint as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why `causeway join` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The token could not be read.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// An `--endpoint` is not `host:port`.
    #[error("--endpoint {spec:?} {reason}")]
    Endpoint {
        /// The endpoint as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file could not be read.
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The config file has problems already, before anything is added.
    #[error("{0}\nfix the config file first; nothing was changed")]
    Config(ConfigErrors),
    /// The private key could not be read or created.
    #[error("{}: site.private_key_file: {source}", path.display())]
    Key {
        /// The config file.
        path: PathBuf,
        /// What went wrong with the key.
        source: KeyError,
    },
    /// The token was made by this very site.
    #[error(
        "this token is this site's own invite (public key {public_key}): send it to the other site, and join the token it prints; nothing was changed"
    )]
    OwnToken {
        /// This site's public key.
        public_key: String,
    },
    /// A peer with the token's public key or name is in the file already.
    #[error("{}: {why}; nothing was changed", path.display())]
    PeerExists {
        /// The config file.
        path: PathBuf,
        /// Which peer, and what it shares with the token.
        why: String,
    },
    /// The file would not be valid with the peer added (one problem per
    /// line).
    #[error("{}\nthe config file would have these problems with peer {name:?} added; nothing was changed", problems.join("\n"))]
    Invalid {
        /// The name the peer would have had.
        name: String,
        /// Every problem, one line each, naming the file and the field.
        problems: Vec<String>,
    },
    /// `<state_dir>/views.json` could not be read to check the views.
    #[error("{}: site.state_dir: {source}; nothing was changed", path.display())]
    State {
        /// The config file.
        path: PathBuf,
        /// What went wrong.
        source: views::StateError,
    },
    /// The file changed while `join` ran.
    #[error("{}: the file changed while joining; run `causeway join` again; nothing was changed", path.display())]
    Changed {
        /// The config file.
        path: PathBuf,
    },
    /// The new file could not be written.
    #[error("{}: cannot write the config file: {source}; nothing was changed", path.display())]
    Write {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
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

/// `causeway invite`: reads the config file at `path` (parsing it without
/// resolving host names or touching `views.json`) and the site's private
/// key (creating it if missing, as the daemon would), and returns the
/// site's invite. `endpoints` come first in the token's endpoints.
pub fn invite(path: &Path, endpoints: &[String]) -> Result<Invite, InviteError> {
    for spec in endpoints {
        check_endpoint(spec).map_err(|reason| InviteError::Endpoint {
            spec: spec.clone(),
            reason,
        })?;
    }
    let text = fs::read_to_string(path).map_err(|source| InviteError::Read {
        path: path.to_owned(),
        source,
    })?;
    let config = config::parse(&text, &path.display().to_string()).map_err(InviteError::Config)?;
    let key =
        keys::load_or_create_private_key(&config.site.private_key_file).map_err(|source| {
            InviteError::Key {
                path: path.to_owned(),
                source,
            }
        })?;
    Ok(Invite::of_site(&config, PublicKey::from(&key), endpoints))
}

/// What [`join`] did.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The file that was changed (after following symbolic links).
    pub path: PathBuf,
    /// The peer as added.
    pub peer: PeerConfig<Parsed>,
    /// The views it is expected to get, index-aligned with its `cidrs`
    /// (computed from `views.json` now; the daemon gives them when it
    /// reloads).
    pub views: Vec<View>,
    /// The rendezvous servers added.
    pub rendezvous_added: Vec<InviteRendezvous>,
    /// The token's rendezvous servers the file pinned already.
    pub rendezvous_known: Vec<InviteRendezvous>,
    /// This site's own invite, for the other site to join back.
    pub invite: Invite,
}

impl Joined {
    /// What `causeway join` prints: what was added, what to do next and,
    /// on the last line alone, this site's token.
    pub fn report(&self) -> String {
        let peer = &self.peer;
        let mut out = format!("{}: added\n", self.path.display());
        let cidrs: Vec<String> = self.views.iter().map(View::to_string).collect();
        out += &format!(
            "  peer {:?}: public key {}, cidrs {}",
            peer.name,
            keys::encode_public(&peer.public_key),
            cidrs.join(", ")
        );
        match &peer.endpoint {
            Some(endpoint) => out += &format!(", endpoint {}\n", endpoint.spec),
            None => out += ", no endpoint (reached through a rendezvous, or once it connects)\n",
        }
        for r in &self.rendezvous_added {
            out += &format!(
                "  rendezvous {}: public key {}\n",
                r.address,
                keys::encode_public(&r.public_key)
            );
        }
        for r in &self.rendezvous_known {
            out += &format!(
                "  (rendezvous with public key {} was already there)\n",
                keys::encode_public(&r.public_key)
            );
        }
        out += "Compare the public key above with the one the other site shows (`wg pubkey < its key file`).\n";
        if self.rendezvous_added.is_empty() {
            out += "A running daemon adds the peer when it reloads its configuration (SIGHUP, or on its own when it sees the file change).\n";
        } else {
            out += "A running daemon needs a restart for this: it reloads peers on SIGHUP or when the file changes, but refuses a reload that changes [[rendezvous]] (docs/config.md, Reloading).\n";
        }
        if peer.endpoint.is_none()
            && self.invite.endpoints.is_empty()
            && self.invite.rendezvous.is_empty()
        {
            out += "Warning: neither site has an endpoint nor a rendezvous, so neither can reach the other: give one of them an --endpoint (or advertise_endpoints), or add a [[rendezvous]].\n";
        }
        if !self.invite.rendezvous.is_empty() {
            out += &format!(
                "Each rendezvous serves only the sites its rendezvous.toml lists: it must list this site ([[site]] name = {:?}, public_key = {:?}).\n",
                self.invite.site,
                keys::encode_public(&self.invite.public_key)
            );
        }
        out += &format!(
            "Send this token back to {:?} for `causeway join` there:\n",
            peer.name
        );
        out += &self.invite.encode();
        out.push('\n');
        out
    }
}

/// `causeway join`: adds the site of `token` to the config file at `path`
/// as a peer named `name` (default: the token's site name), with its
/// rendezvous servers, and returns what was done and this site's own
/// invite (with `endpoints` first, as [`invite`]). See the module doc.
pub fn join(
    path: &Path,
    token: &str,
    name: Option<&str>,
    endpoints: &[String],
) -> Result<Joined, JoinError> {
    let theirs = Invite::decode(token)?;
    for spec in endpoints {
        check_endpoint(spec).map_err(|reason| JoinError::Endpoint {
            spec: spec.clone(),
            reason,
        })?;
    }
    let read_error = |source| JoinError::Read {
        path: path.to_owned(),
        source,
    };
    // Replace the target of a symbolic link, not the link.
    let path = fs::canonicalize(path).map_err(read_error)?;
    let origin = path.display().to_string();
    let original = fs::read_to_string(&path).map_err(read_error)?;
    let current = config::parse(&original, &origin).map_err(JoinError::Config)?;
    let key =
        keys::load_or_create_private_key(&current.site.private_key_file).map_err(|source| {
            JoinError::Key {
                path: path.clone(),
                source,
            }
        })?;
    let own = PublicKey::from(&key);

    let appended = append_peer(&original, &origin, &current, &own, &theirs, name)?;
    let config = appended.config;
    let state_file = config.site.state_dir.join(views::STATE_FILE);
    let persisted = Persisted::load(&state_file).map_err(|source| JoinError::State {
        path: path.clone(),
        source,
    })?;
    let (peer, views) = expected_views(&config, &persisted, &origin)?;

    replace_file(&path, &original, &appended.text)?;
    Ok(Joined {
        invite: Invite::of_site(&config, own, endpoints),
        path,
        peer,
        views,
        rendezvous_added: appended.rendezvous_added,
        rendezvous_known: appended.rendezvous_known,
    })
}

/// The file's text with the peer (and rendezvous) appended, validated.
#[derive(Debug)]
struct Appended {
    text: String,
    config: Config<Parsed>,
    rendezvous_added: Vec<InviteRendezvous>,
    rendezvous_known: Vec<InviteRendezvous>,
}

/// Appends `theirs` to `text` (whose parsed form is `current`) and checks
/// the result; pure.
fn append_peer(
    text: &str,
    origin: &str,
    current: &Config<Parsed>,
    own: &PublicKey,
    theirs: &Invite,
    name: Option<&str>,
) -> Result<Appended, JoinError> {
    if theirs.public_key == *own {
        return Err(JoinError::OwnToken {
            public_key: keys::encode_public(own),
        });
    }
    let name = name.unwrap_or(&theirs.site);
    for (i, peer) in current.peers.iter().enumerate() {
        let why = if peer.public_key == theirs.public_key {
            format!(
                "peer[{i}] {:?} already has public key {} (site {:?} of the token); it was joined before",
                peer.name,
                keys::encode_public(&peer.public_key),
                theirs.site
            )
        } else if peer.name == name {
            format!(
                "peer[{i}] {:?} already has that name, with another public key; give the new peer another name with --name, or remove the old one",
                peer.name
            )
        } else {
            continue;
        };
        return Err(JoinError::PeerExists {
            path: PathBuf::from(origin),
            why,
        });
    }

    let mut out = text.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push('\n');
    }
    let renamed = if name == theirs.site {
        String::new()
    } else {
        format!(" (site {})", theirs.site)
    };
    out += &format!("# Peer {name}{renamed}, added by `causeway join`.\n[[peer]]\n");
    out += &format!("name = {}\n", quote(name));
    out += &format!(
        "public_key = {}\n",
        quote(&keys::encode_public(&theirs.public_key))
    );
    let cidrs: Vec<String> = theirs
        .pod_cidrs
        .iter()
        .map(|c| quote(&c.to_string()))
        .collect();
    out += &format!("cidrs = [{}]\n", cidrs.join(", "));
    if let Some(endpoint) = theirs.endpoints.first() {
        out += &format!("endpoint = {}\n", quote(endpoint));
    }
    let mut rendezvous_added = Vec::new();
    let mut rendezvous_known = Vec::new();
    for r in &theirs.rendezvous {
        let pinned = current
            .rendezvous
            .iter()
            .any(|c| c.public_key == r.public_key)
            || rendezvous_added
                .iter()
                .any(|a: &InviteRendezvous| a.public_key == r.public_key);
        if pinned {
            rendezvous_known.push(r.clone());
            continue;
        }
        out += &format!("\n# Rendezvous of {name}, added by `causeway join`.\n[[rendezvous]]\n");
        out += &format!("address = {}\n", quote(&r.address));
        out += &format!(
            "public_key = {}\n",
            quote(&keys::encode_public(&r.public_key))
        );
        if let Some(stun) = &r.stun {
            out += &format!("stun = {}\n", quote(stun));
        }
        rendezvous_added.push(r.clone());
    }
    let config = config::parse(&out, origin).map_err(|errors| JoinError::Invalid {
        name: name.to_owned(),
        problems: errors.problems().to_vec(),
    })?;
    Ok(Appended {
        text: out,
        config,
        rendezvous_added,
        rendezvous_known,
    })
}

/// The last peer of `config` (the one just added) and the views it would
/// get now, as the daemon computes them when it loads the file; every CIDR
/// that would get none is an error.
fn expected_views(
    config: &Config<Parsed>,
    persisted: &Persisted,
    origin: &str,
) -> Result<(PeerConfig<Parsed>, Vec<View>), JoinError> {
    let peer = config
        .peers
        .last()
        .cloned()
        .ok_or_else(|| JoinError::Changed {
            path: PathBuf::from(origin),
        })?;
    match config::assign_views(config, persisted) {
        Ok((views, _)) => {
            let views = views
                .into_iter()
                .last()
                .unwrap_or_else(|| peer.cidrs.iter().copied().map(View::identity).collect());
            Ok((peer, views))
        }
        Err(errors) => {
            let problems = errors
                .iter()
                .map(|e| {
                    let name = config.peers.get(e.peer).map_or("", |p| &p.name);
                    format!(
                        "{origin}: peer[{}] {name:?}: cidrs[{}]: {e}",
                        e.peer, e.cidr
                    )
                })
                .collect();
            Err(JoinError::Invalid {
                name: peer.name,
                problems,
            })
        }
    }
}

/// Replaces `path` (whose text was `original`) with `text`, atomically
/// and keeping its mode and owner, unless the file changed meanwhile.
fn replace_file(path: &Path, original: &str, text: &str) -> Result<(), JoinError> {
    let write_error = |source| JoinError::Write {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(write_error)?;
    if fs::read_to_string(path).map_err(write_error)? != original {
        return Err(JoinError::Changed {
            path: path.to_owned(),
        });
    }
    atomic_replace_owned(
        path,
        text.as_bytes(),
        meta.mode() & 0o7777,
        (meta.uid(), meta.gid()),
    )
    .map_err(write_error)
}

/// Checks `host:port` as the config file takes it: an IP literal (IPv6 in
/// brackets) or a DNS name, and a port from 1 to 65535. On error, says
/// what is wrong after the quoted endpoint.
fn check_endpoint(spec: &str) -> Result<(), String> {
    config::parse_endpoint(spec).map(drop)
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KEY_A: &str = "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk=";
    const KEY_B: &str = "ZkgvCW+DIoRG24ZST7MmKM5j/X9m/LO8XA0qLN0Fxm0=";
    const KEY_R: &str = "Uxw5597LYTGBKqnK/Jz6KjYh2ZodZF4sbhwR6zaqX2E=";

    fn key(text: &str) -> PublicKey {
        keys::decode_public(text).unwrap()
    }

    fn sample() -> Invite {
        Invite {
            site: "pharma".into(),
            public_key: key(KEY_A),
            pod_cidrs: vec![
                "10.0.0.0/16".parse().unwrap(),
                "fd00:10::/64".parse().unwrap(),
            ],
            endpoints: vec![
                "gw.pharma.example:51820".into(),
                "[2001:db8::7]:51820".into(),
            ],
            rendezvous: vec![
                InviteRendezvous {
                    address: "rendezvous.example.net:7443".into(),
                    public_key: key(KEY_R),
                    stun: None,
                },
                InviteRendezvous {
                    address: "198.18.0.1:7443".into(),
                    public_key: key(KEY_B),
                    stun: Some("198.18.0.1:3479".into()),
                },
            ],
        }
    }

    /// The JSON inside a token.
    fn json_of(token: &str) -> serde_json::Value {
        let body = token.strip_prefix("cw1.").unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap()
    }

    fn token_of(json: &str) -> String {
        format!("cw1.{}", URL_SAFE_NO_PAD.encode(json))
    }

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

    fn site_config(dir: &Path, extra_site: &str, rest: &str) -> String {
        format!(
            "[site]\nname = \"hospital\"\nprivate_key_file = {:?}\nstate_dir = {:?}\npod_cidrs = [\"10.0.0.0/16\"]\n{extra_site}\n{rest}",
            dir.join("private.key").display().to_string(),
            dir.join("state").display().to_string(),
        )
    }

    #[test]
    fn the_invite_of_a_site_holds_only_public_facts() {
        let dir = tempfile::tempdir().unwrap();
        let text = site_config(
            dir.path(),
            "advertise_endpoints = [\"203.0.113.7:51820\", \"[2001:db8::7]:51820\"]",
            &format!(
                "[[peer]]\nname = \"lab\"\npublic_key = \"{KEY_B}\"\ncidrs = [\"10.9.0.0/16\"]\n\n\
                 [[rendezvous]]\naddress = \"rendezvous.example.net:7443\"\npublic_key = \"{KEY_R}\"\n\n\
                 [[rendezvous]]\naddress = \"[2001:db8::1]:7443\"\npublic_key = \"{KEY_B}\"\nstun = \"[2001:db8::1]:3479\"\n\n\
                 [[rendezvous]]\naddress = \"[2001:db8::2]:7443\"\npublic_key = \"{KEY_A}\"\nstun = \"[2001:db8::2]:3478\"\n"
            ),
        );
        let path = dir.path().join("causeway.toml");
        fs::write(&path, &text).unwrap();
        let endpoints = [
            "gw.hospital.example:51820".to_owned(),
            "203.0.113.7:51820".to_owned(),
        ];
        let invite = invite(&path, &endpoints).unwrap();
        let private = fs::read_to_string(dir.path().join("private.key")).unwrap();
        let private_key = keys::decode_private(&private).unwrap();
        assert_eq!(invite.public_key, PublicKey::from(&private_key));
        assert_eq!(invite.site, "hospital");
        assert_eq!(
            invite.endpoints,
            [
                "gw.hospital.example:51820",
                "203.0.113.7:51820",
                "[2001:db8::7]:51820"
            ]
        );
        let stuns: Vec<Option<&str>> = invite
            .rendezvous
            .iter()
            .map(|r| r.stun.as_deref())
            .collect();
        assert_eq!(stuns, [None, Some("[2001:db8::1]:3479"), None]);

        let token = invite.encode();
        let json = json_of(&token).to_string();
        let private_b64 = private.trim();
        for secret in [
            private_b64.to_owned(),
            private_b64.replace('+', "-").replace('/', "_"),
        ] {
            assert!(
                !json.contains(&secret) && !token.contains(&secret[..20]),
                "{json}"
            );
        }
        // Nothing about local settings or files either.
        for local in [
            "private",
            "state",
            "10.9.0.0",
            "lab",
            dir.path().to_str().unwrap(),
        ] {
            assert!(!json.contains(local), "{local} in {json}");
        }
        // And no state was written: invite reads, it does not load views.
        assert!(!dir.path().join("state").exists());

        let err = super::invite(&path, &["nowhere".to_owned()])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--endpoint \"nowhere\" has no port"),
            "{err}"
        );
        fs::write(&path, "[site]\n").unwrap();
        let err = super::invite(&path, &[]).unwrap_err();
        assert!(matches!(err, InviteError::Config(_)), "{err:?}");
    }

    fn current(text: &str) -> Config<Parsed> {
        config::parse(text, "c.toml").unwrap()
    }

    #[test]
    fn appending_keeps_the_file_and_starts_on_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        // An allow rule last, no trailing newline, a comment.
        let text = site_config(
            dir.path(),
            "",
            &format!(
                "[[peer]]\nname = \"lab\"\npublic_key = \"{KEY_B}\"\ncidrs = [\"10.9.0.0/16\"]\n\n\
                 [[peer.allow]]\ncidr = \"10.0.5.0/24\"\nproto = \"tcp\"  # the end"
            ),
        );
        let mut theirs = sample();
        theirs.public_key = key("YIc7tjkQxy1Jrd8zt0fIbdsg+IvjgKWvmBhMP9hwVWE=");
        let appended =
            append_peer(&text, "c.toml", &current(&text), &key(KEY_R), &theirs, None).unwrap();
        assert!(
            appended
                .text
                .starts_with(&format!("{text}\n\n# Peer pharma")),
            "{}",
            appended.text
        );
        let config = appended.config;
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.peers[0].allow.len(), 1, "the allow rule moved");
        let peer = &config.peers[1];
        assert_eq!(peer.name, "pharma");
        assert_eq!(peer.public_key, theirs.public_key);
        assert_eq!(peer.cidrs, theirs.pod_cidrs);
        assert!(peer.allow.is_empty());
        assert_eq!(
            peer.endpoint.as_ref().unwrap().spec,
            "gw.pharma.example:51820"
        );
        assert_eq!(config.rendezvous.len(), 2);
        assert_eq!(config.rendezvous[1].stun.spec, "198.18.0.1:3479");
        assert_eq!(appended.rendezvous_added.len(), 2);

        // A rendezvous the file pins already is not added again, whatever
        // its address there.
        let text = format!(
            "{}\n[[rendezvous]]\naddress = \"10.1.1.1:7443\"\npublic_key = \"{KEY_R}\"\n",
            site_config(dir.path(), "", "")
        );
        let appended = append_peer(
            &text,
            "c.toml",
            &current(&text),
            &key(KEY_B),
            &sample(),
            Some("pharma-eu"),
        )
        .unwrap();
        assert_eq!(appended.rendezvous_known.len(), 1);
        assert_eq!(appended.rendezvous_added.len(), 1);
        assert_eq!(appended.config.rendezvous.len(), 2);
        assert_eq!(appended.config.peers[0].name, "pharma-eu");
        assert!(
            appended.text.contains("# Peer pharma-eu (site pharma)"),
            "{}",
            appended.text
        );
        assert!(
            appended.text.ends_with("stun = \"198.18.0.1:3479\"\n"),
            "{}",
            appended.text
        );

        // An empty file gets no leading blank line (and then fails: no site).
        let err =
            append_peer("", "c.toml", &current(&text), &key(KEY_B), &sample(), None).unwrap_err();
        assert!(matches!(err, JoinError::Invalid { .. }), "{err:?}");
    }

    #[test]
    fn joining_refuses_own_token_and_existing_peers() {
        let dir = tempfile::tempdir().unwrap();
        let text = site_config(
            dir.path(),
            "",
            &format!(
                "[[peer]]\nname = \"pharma\"\npublic_key = \"{KEY_B}\"\ncidrs = [\"10.9.0.0/16\"]\n"
            ),
        );
        let config = current(&text);
        let err = append_peer(&text, "c.toml", &config, &key(KEY_A), &sample(), None).unwrap_err();
        assert!(matches!(err, JoinError::OwnToken { .. }), "{err:?}");
        assert!(err.to_string().contains(KEY_A), "{err}");

        // Same name, other key: say which peer, suggest --name.
        let mut theirs = sample();
        theirs.public_key = key(KEY_R);
        let err = append_peer(&text, "c.toml", &config, &key(KEY_A), &theirs, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("peer[0] \"pharma\" already has that name"),
            "{err}"
        );
        assert!(err.contains("--name"), "{err}");
        assert!(
            append_peer(
                &text,
                "c.toml",
                &config,
                &key(KEY_A),
                &theirs,
                Some("pharma-2")
            )
            .is_ok()
        );

        // Same key, whatever the name.
        theirs.public_key = key(KEY_B);
        let err = append_peer(
            &text,
            "c.toml",
            &config,
            &key(KEY_A),
            &theirs,
            Some("other"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!(
                "peer[0] \"pharma\" already has public key {KEY_B}"
            )),
            "{err}"
        );

        // A name the config does not take is reported by the config check.
        theirs.public_key = key(KEY_R);
        let err = append_peer(
            &text,
            "c.toml",
            &config,
            &key(KEY_A),
            &theirs,
            Some("Bad Name"),
        )
        .unwrap_err();
        let JoinError::Invalid { problems, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("c.toml: peer[1] \"Bad Name\": name:"),
            "{problems:?}"
        );
    }

    #[test]
    fn overlapping_cidrs_get_views_or_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("causeway.toml");
        let text = site_config(dir.path(), "", "");
        fs::write(&path, &text).unwrap();
        let mut theirs = sample();
        theirs.pod_cidrs.truncate(1); // 10.0.0.0/16, ours too
        let joined = join(&path, &theirs.encode(), None, &[]).unwrap();
        assert_eq!(
            joined.views[0].to_string(),
            "10.0.0.0/16 seen as 100.64.0.0/16"
        );
        let report = joined.report();
        assert!(
            report.contains("cidrs 10.0.0.0/16 seen as 100.64.0.0/16"),
            "{report}"
        );
        assert!(
            report.ends_with(&format!("\n{}\n", joined.invite.encode())),
            "{report}"
        );
        assert!(!dir.path().join("state").exists(), "join wrote views.json");

        // With no room left in remap_pool, the file is left as it was.
        let text = site_config(dir.path(), "remap_pool = [\"100.64.0.0/16\"]", "");
        fs::write(&path, &text).unwrap();
        let mut lab = theirs.clone();
        lab.site = "lab".into();
        lab.public_key = key(KEY_B);
        join(&path, &lab.encode(), None, &[]).unwrap();
        let before = fs::read_to_string(&path).unwrap();
        let err = join(&path, &theirs.encode(), None, &[]).unwrap_err();
        let JoinError::Invalid { problems, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(
            problems[0].contains("peer[1] \"pharma\": cidrs[0]: 10.0.0.0/16 overlaps"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), before);
    }

    #[test]
    fn the_file_is_replaced_keeping_its_mode_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.toml");
        fs::write(&real, site_config(dir.path(), "", "")).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("causeway.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let joined = join(&link, &sample().encode(), None, &[]).unwrap();
        assert_eq!(joined.path, fs::canonicalize(&real).unwrap());
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(
            fs::read_to_string(&real)
                .unwrap()
                .contains("name = \"pharma\"")
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // A file changed meanwhile is not overwritten.
        let err = replace_file(&real, "something else", "new").unwrap_err();
        assert!(matches!(err, JoinError::Changed { .. }), "{err:?}");
        assert!(
            fs::read_to_string(&real)
                .unwrap()
                .contains("name = \"pharma\"")
        );
    }
}
