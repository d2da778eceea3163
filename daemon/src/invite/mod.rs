//! Peering two sites without editing their files by hand: `causeway invite`
//! and `causeway join`.
//!
//! This file holds the two operations; `token.rs` the token codec
//! ([`Invite`]), `append.rs` the TOML text that `join` appends and
//! `report.rs` what `join` prints.
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
//! whitespace inside it (a line broken by a mail client) is ignored; one
//! longer than [`MAX_TOKEN_LEN`] (4096) characters is refused.
//!
//! Every value of a decoded token is checked ([`Invite::check`]) by the
//! rules the config file applies, and a token is refused naming the
//! field at fault: `site` must be a peer name (`[a-z0-9-]{1,32}`), keys
//! 32 bytes of base64, endpoints and rendezvous addresses `host:port` as
//! the config takes them, `pod_cidrs` non-empty, in canonical form and not
//! overlapping each other. A token's pod CIDR is also refused when it is
//! the default route, broader than a `/8` (IPv4) or a `/32` (IPv6), or
//! overlaps one of [`NOT_POD_NETWORKS`] ("this network" 0.0.0.0/8,
//! loopback, link-local, multicast, 240.0.0.0/4, the unspecified IPv6
//! address, IPv4-mapped IPv6): joining it would route traffic that is no
//! pod network's into the tunnel. `invite` checks its own token the same
//! way and prints none that `join` would refuse.
//!
//! # Join
//!
//! [`join`] checks the token (not damaged, of this version, every value
//! as above, not this site's own: same public key) and `--name`, refuses a
//! peer whose public key or name the file already has (naming that peer),
//! then appends to the file, as text so that the operator's comments and
//! layout stay:
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
//! to the new tables. Every value is written as a one-line TOML basic
//! string (quotes, backslashes and control characters escaped), and the
//! comments above the tables hold only the checked names. The new text is
//! validated with [`config::parse`], which must give exactly the file's
//! previous site, peers and rendezvous plus the new ones with the token's
//! values, and the views the new peer would get are computed from
//! `views.json` (read, never written) before anything is written: a token
//! CIDR that overlaps this site's networks gets a view, and one that
//! cannot get one (no room in `remap_pool`) is refused. On any problem the
//! file is left untouched and every problem reported. The file is then replaced
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
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use causeway_common::fs::atomic_replace_owned;

use crate::config::{self, Config, ConfigErrors, Parsed, PeerConfig};
use crate::keys::{self, KeyError, PublicKey};
use crate::packet::View;
use crate::views::{self, Persisted};

mod append;
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod hostile;
mod report;
mod token;

use append::append_peer;
use token::check_endpoint;
pub use token::{
    Invite, InviteRendezvous, MAX_TOKEN_LEN, MIN_POD_PREFIX_V4, MIN_POD_PREFIX_V6,
    NOT_POD_NETWORKS, Refusal, TOKEN_PREFIX, TOKEN_VERSION, TokenError,
};

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
    /// `causeway join` would refuse the token (see [`Invite::check`]).
    #[error("{}: no token printed: `causeway join` would refuse it: {}: {}", path.display(), refusal.field, refusal.reason)]
    Unjoinable {
        /// The config file.
        path: PathBuf,
        /// What `join` would refuse.
        refusal: Refusal,
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
    /// `--name` is not a valid peer name.
    #[error(
        "--name {name:?} is not a valid peer name; use 1 to 32 characters from a-z, 0-9 and '-'; nothing was changed"
    )]
    Name {
        /// The name as given.
        name: String,
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
    /// The file with the new text appended would not hold exactly what it
    /// held before plus the one peer (and its rendezvous): a bug of `join`.
    #[error("{}: with the text for peer {name:?} appended, the file would {why}; nothing was changed (this is a bug of `causeway join`: please report it with the token)", path.display())]
    NotJustThePeer {
        /// The config file.
        path: PathBuf,
        /// The name the peer would have had.
        name: String,
        /// What else would have changed.
        why: String,
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
    let invite = Invite::of_site(&config, PublicKey::from(&key), endpoints);
    invite.check().map_err(|refusal| InviteError::Unjoinable {
        path: path.to_owned(),
        refusal,
    })?;
    Ok(invite)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::fixtures::*;
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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

        // No token is printed that `join` would refuse.
        fs::write(&path, text.replace("10.0.0.0/16", "16.0.0.0/4")).unwrap();
        let err = super::invite(&path, &[]).unwrap_err().to_string();
        assert!(
            err.contains("no token printed: `causeway join` would refuse it: pod_cidrs[0]: 16.0.0.0/4 is broader than /8"),
            "{err}"
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
