//! View CIDRs: how this site sees each peer's networks, and the state file
//! that keeps them stable.
//!
//! Every site decides on its own how it sees its peers. For each of a
//! peer's real CIDRs, the view is the real CIDR itself, unless that would
//! overlap one of this site's `pod_cidrs`, one of its `reserved_cidrs`, or a
//! view already given to another peer CIDR: then a view of the same size,
//! aligned on its size, is taken from the site's `remap_pool` (same address
//! family). Local pods reach a remapped peer at its view; the data path
//! rewrites `view → real` on the way out and `real → view` on the way in
//! (see [`crate::packet`]).
//!
//! A restart must not renumber anything, so [`assign`] takes the views that
//! were given before ([`Persisted`], the `views.json` file in the site's
//! `state_dir`) and honours every one that is still valid before it
//! computes anything new. Identity views are recorded too: a peer that was
//! seen at its real CIDR keeps it even if an overlapping peer is added
//! before it in the configuration file later.
//!
//! [`assign`] is a pure function; [`Persisted::load`] and
//! [`Persisted::save`] are the only I/O.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use causeway_common::fs::atomic_replace;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::packet::View;

/// The name of the state file inside the site's `state_dir`.
pub const STATE_FILE: &str = "views.json";
/// The format version written to (and required in) the state file.
pub const STATE_VERSION: u32 = 1;

/// One peer as [`assign`] needs it.
#[derive(Debug, Clone, Copy)]
pub struct PeerCidrs<'a> {
    /// The peer's name, for messages and the state file.
    pub name: &'a str,
    /// The peer's public key in `wg pubkey` form: what allocations are
    /// keyed by, so that renaming a peer keeps its views.
    pub public_key: &'a str,
    /// The peer's real CIDRs. They must not overlap each other.
    pub cidrs: &'a [IpNet],
}

/// The views given so far, as kept in `<state_dir>/views.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Persisted {
    /// One entry per (peer public key, real CIDR), sorted by both.
    pub views: Vec<PersistedView>,
}

/// One entry of the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedView {
    /// The peer's name when the entry was written; for people reading the
    /// file only.
    #[serde(default)]
    pub peer: String,
    /// The peer's public key in `wg pubkey` form.
    pub public_key: String,
    /// The peer's real CIDR.
    pub real: IpNet,
    /// This site's view of it.
    pub view: IpNet,
}

/// The state file as written.
#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    views: Vec<PersistedView>,
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but could not be read.
    #[error("cannot read {}: {source}; check that it is a readable regular file", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file does not hold views in the expected format.
    #[error("{} is not a valid views file: {reason}; fix it, or move it away to allocate the views afresh (remapped peers may then get other views)", path.display())]
    Invalid {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The directory or the file could not be written.
    #[error("cannot write {}: {source}; make site.state_dir a writable directory", path.display())]
    Write {
        /// The file or directory that failed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl Persisted {
    /// Reads the state file; a missing file is an empty state (a first
    /// start).
    pub fn load(path: &Path) -> Result<Persisted, StateError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Persisted::default()),
            Err(source) => {
                return Err(StateError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Persisted::from_json(&text).map_err(|reason| StateError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Writes the state file atomically (mode 0600, see
    /// [`causeway_common::fs::atomic_replace`]). The directory is created
    /// with mode 0700 if it is missing.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Write {
                path: dir.to_owned(),
                source,
            })?;
        atomic_replace(path, self.to_json().as_bytes(), 0o600).map_err(|source| StateError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// The state file's text: pretty JSON ending in a newline.
    pub fn to_json(&self) -> String {
        let file = StateFile {
            version: STATE_VERSION,
            views: self.views.clone(),
        };
        // Serializing strings and CIDRs cannot fail.
        let mut text = serde_json::to_string_pretty(&file).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Parses the state file's text; the error says what is wrong.
    pub fn from_json(text: &str) -> Result<Persisted, String> {
        let file: StateFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if file.version != STATE_VERSION {
            return Err(format!(
                "version {} is not supported; this daemon reads version {STATE_VERSION}",
                file.version
            ));
        }
        Ok(Persisted { views: file.views })
    }
}

/// Why a peer CIDR got no view. The peer and CIDR are given by index into
/// the `peers` passed to [`assign`] and into that peer's `cidrs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignError {
    /// Index of the peer.
    pub peer: usize,
    /// Index of the CIDR in the peer's `cidrs`.
    pub cidr: usize,
    /// The peer's real CIDR.
    pub real: IpNet,
    /// Why the real CIDR cannot be its own view, e.g.
    /// `overlaps site.pod_cidrs[0] 10.0.0.0/16`.
    pub conflict: String,
    /// Why no view could be taken from the pool.
    pub shortage: Shortage,
}

/// Why `remap_pool` could not provide a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// The pool has no CIDR of the real CIDR's address family.
    NoFamily,
    /// Every pool CIDR of that family is smaller than the real CIDR.
    TooSmall,
    /// The pool CIDRs of that family have no free block of that size left.
    Exhausted,
}

impl std::error::Error for AssignError {}

impl fmt::Display for AssignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (family, example) = match self.real {
            IpNet::V4(_) => ("IPv4", "100.64.0.0/10"),
            IpNet::V6(_) => ("IPv6", "fd63:6175:7365::/48"),
        };
        let len = self.real.prefix_len();
        write!(
            f,
            "{} {}, so it needs a view from site.remap_pool, but ",
            self.real, self.conflict
        )?;
        match self.shortage {
            Shortage::NoFamily => write!(
                f,
                "remap_pool has no {family} CIDR; add one, e.g. \"{example}\""
            ),
            Shortage::TooSmall => write!(
                f,
                "no {family} CIDR in remap_pool holds a /{len}; add a /{len} or larger"
            ),
            Shortage::Exhausted => write!(
                f,
                "its {family} CIDRs have no free /{len} left; add another {family} CIDR to remap_pool"
            ),
        }
    }
}

/// Gives every peer CIDR a view.
///
/// `pod_cidrs` and `reserved` are this site's own networks, which views
/// must never overlap; `pool` is where remapped views come from (its
/// entries must not overlap `pod_cidrs` or `reserved`: the configuration
/// checks that). The order of work is:
///
/// 1. entries of `persisted` that are still valid: the peer (by public key)
///    still lists the real CIDR, the view has the real CIDR's family and
///    size, overlaps no local or reserved network and no view kept before
///    it, and a remapped view still lies inside `pool`;
/// 2. the real CIDR itself, for every CIDR left, in peer order, when it
///    overlaps nothing local, reserved or already given;
/// 3. the first free aligned block of the real CIDR's size in `pool`, for
///    every CIDR left, in peer order.
///
/// Returns the views, index-aligned with `peers` and their `cidrs`, and the
/// state to persist: every view given, entries of peers or CIDRs no longer
/// configured dropped. Every CIDR that gets no view is reported.
pub fn assign(
    pod_cidrs: &[IpNet],
    reserved: &[IpNet],
    pool: &[IpNet],
    peers: &[PeerCidrs<'_>],
    persisted: &Persisted,
) -> Result<(Vec<Vec<View>>, Persisted), Vec<AssignError>> {
    let mut views: Vec<Vec<Option<View>>> =
        peers.iter().map(|p| vec![None; p.cidrs.len()]).collect();
    // Every view given so far, with the index of its peer.
    let mut given: Vec<(IpNet, usize)> = Vec::new();
    let local_conflict = |net: &IpNet| -> Option<String> {
        let pod = pod_cidrs
            .iter()
            .enumerate()
            .find(|(_, c)| overlaps(c, net))
            .map(|(i, c)| format!("overlaps site.pod_cidrs[{i}] {c}"));
        pod.or_else(|| {
            reserved
                .iter()
                .enumerate()
                .find(|(_, c)| overlaps(c, net))
                .map(|(i, c)| format!("overlaps site.reserved_cidrs[{i}] {c}"))
        })
    };

    // 1. What was given before, while still valid.
    for entry in &persisted.views {
        let Some(p) = peers.iter().position(|p| p.public_key == entry.public_key) else {
            continue;
        };
        let Some(c) = peers[p].cidrs.iter().position(|c| *c == entry.real) else {
            continue;
        };
        let Ok(view) = View::new(entry.real, entry.view) else {
            continue;
        };
        let net = *view.view();
        let valid = views[p][c].is_none()
            && local_conflict(&net).is_none()
            && !given.iter().any(|(g, _)| overlaps(g, &net))
            && (!view.is_remapped() || pool.iter().any(|pool| pool.contains(&net)));
        if valid {
            views[p][c] = Some(view);
            given.push((net, p));
        }
    }

    // 2. The real CIDR itself where it collides with nothing.
    let mut pending = Vec::new();
    for (p, peer) in peers.iter().enumerate() {
        for (c, real) in peer.cidrs.iter().enumerate() {
            if views[p][c].is_some() {
                continue;
            }
            let conflict = local_conflict(real).or_else(|| {
                given.iter().find(|(g, _)| overlaps(g, real)).map(|(g, o)| {
                    let name = peers.get(*o).map_or("", |o| o.name);
                    format!("overlaps the view {g} of peer {name:?}")
                })
            });
            match conflict {
                None => {
                    views[p][c] = Some(View::identity(*real));
                    given.push((*real, p));
                }
                Some(conflict) => pending.push((p, c, *real, conflict)),
            }
        }
    }

    // 3. A block of the pool for the rest.
    let mut errors = Vec::new();
    for (p, c, real, conflict) in pending {
        let taken: Vec<IpNet> = pod_cidrs
            .iter()
            .chain(reserved)
            .copied()
            .chain(given.iter().map(|(g, _)| *g))
            .collect();
        // `allocate` only returns blocks of the real CIDR's shape.
        let view = allocate(&real, pool, &taken)
            .and_then(|net| View::new(real, net).map_err(|_| Shortage::Exhausted));
        match view {
            Ok(view) => {
                views[p][c] = Some(view);
                given.push((*view.view(), p));
            }
            Err(shortage) => errors.push(AssignError {
                peer: p,
                cidr: c,
                real,
                conflict,
                shortage,
            }),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let views: Vec<Vec<View>> = peers
        .iter()
        .zip(views)
        .map(|(peer, views)| {
            peer.cidrs
                .iter()
                .zip(views)
                .map(|(&real, view)| view.unwrap_or(View::identity(real)))
                .collect()
        })
        .collect();
    let mut state: Vec<PersistedView> = peers
        .iter()
        .zip(&views)
        .flat_map(|(peer, views)| {
            views.iter().map(|v| PersistedView {
                peer: peer.name.to_owned(),
                public_key: peer.public_key.to_owned(),
                real: *v.real(),
                view: *v.view(),
            })
        })
        .collect();
    state.sort_by(|a, b| (&a.public_key, a.real).cmp(&(&b.public_key, b.real)));
    Ok((views, Persisted { views: state }))
}

/// Whether two networks share an address.
pub(crate) fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first and last address of a network as numbers.
fn bounds(net: &IpNet) -> (u128, u128) {
    match net {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
    }
}

/// The first free block of `real`'s family and size inside `pool`, aligned
/// on its size, that overlaps nothing in `taken`.
fn allocate(real: &IpNet, pool: &[IpNet], taken: &[IpNet]) -> Result<IpNet, Shortage> {
    let family: Vec<&IpNet> = pool.iter().filter(|p| same_family(p, real)).collect();
    if family.is_empty() {
        return Err(Shortage::NoFamily);
    }
    let len = real.prefix_len();
    let large: Vec<&IpNet> = family
        .into_iter()
        .filter(|p| p.prefix_len() <= len)
        .collect();
    if large.is_empty() {
        return Err(Shortage::TooSmall);
    }
    let host_bits = u32::from(real.max_prefix_len() - len);
    let mask = 1u128.checked_shl(host_bits).map_or(u128::MAX, |b| b - 1);
    let taken: Vec<(u128, u128)> = taken
        .iter()
        .filter(|t| same_family(t, real))
        .map(bounds)
        .collect();
    for block in large {
        let (mut candidate, last) = bounds(block);
        // Each step skips past one taken network, so this ends quickly.
        while candidate <= last {
            let end = candidate | mask;
            let blocking = taken
                .iter()
                .filter(|(s, e)| *s <= end && *e >= candidate)
                .map(|(_, e)| *e)
                .max();
            match blocking {
                None => return net_at(real, candidate).ok_or(Shortage::Exhausted),
                Some(e) => match (e | mask).checked_add(1) {
                    Some(next) => candidate = next,
                    None => break,
                },
            }
        }
    }
    Err(Shortage::Exhausted)
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    a.max_prefix_len() == b.max_prefix_len()
}

/// The network of `like`'s family and prefix length starting at `start`.
fn net_at(like: &IpNet, start: u128) -> Option<IpNet> {
    let addr = match like {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(start).ok()?)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(start)),
    };
    IpNet::new(addr, like.prefix_len()).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    const KEY_A: &str = "ZkgvCW+DIoRG24ZST7MmKM5j/X9m/LO8XA0qLN0Fxm0=";
    const KEY_B: &str = "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk=";
    const KEY_C: &str = "Uxw5597LYTGBKqnK/Jz6KjYh2ZodZF4sbhwR6zaqX2E=";

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nets(list: &str) -> Vec<IpNet> {
        list.split_whitespace().map(net).collect()
    }

    fn default_pool() -> Vec<IpNet> {
        nets("100.64.0.0/10 fd63:6175:7365::/48")
    }

    /// Peers as (name, key, "cidr cidr …").
    fn run(
        local: &str,
        reserved: &str,
        pool: &[IpNet],
        peers: &[(&str, &str, &str)],
        persisted: &Persisted,
    ) -> Result<(Vec<Vec<View>>, Persisted), Vec<AssignError>> {
        let cidrs: Vec<Vec<IpNet>> = peers.iter().map(|(_, _, c)| nets(c)).collect();
        let peers: Vec<PeerCidrs<'_>> = peers
            .iter()
            .zip(&cidrs)
            .map(|(&(name, public_key, _), cidrs)| PeerCidrs {
                name,
                public_key,
                cidrs,
            })
            .collect();
        assign(&nets(local), &nets(reserved), pool, &peers, persisted)
    }

    /// The views only, as "view view …" per peer.
    fn shown(views: &[Vec<View>]) -> Vec<String> {
        views
            .iter()
            .map(|v| {
                v.iter()
                    .map(|v| v.view().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    /// One case per line: `local | reserved | peer cidrs; peer cidrs; … |
    /// expected views; …`, with the default pool and nothing persisted.
    const TABLE: &str = r#"
10.0.0.0/16 |              | 10.1.0.0/16                         | 10.1.0.0/16
10.0.0.0/16 |              | 10.0.0.0/16                         | 100.64.0.0/16
10.0.0.0/16 |              | 10.0.5.0/24                         | 100.64.0.0/24
10.0.0.0/16 |              | 10.0.0.0/8                          | 100.0.0.0/8!
10.0.0.0/16 |              | 10.0.0.0/16; 10.0.0.0/16            | 100.64.0.0/16; 100.65.0.0/16
10.0.0.0/16 |              | 10.1.0.0/16; 10.1.0.0/16            | 10.1.0.0/16; 100.64.0.0/16
10.0.0.0/16 |              | 10.1.0.0/16; 10.1.128.0/17          | 10.1.0.0/16; 100.64.0.0/17
10.0.0.0/16 |              | 10.1.128.0/17; 10.1.0.0/16          | 10.1.128.0/17; 100.64.0.0/16
10.0.0.0/16 | 10.96.0.0/12 | 10.96.0.0/16 10.2.0.0/16            | 100.64.0.0/16 10.2.0.0/16
10.0.0.0/16 |              | 100.64.0.0/16; 10.0.0.0/16          | 100.64.0.0/16; 100.65.0.0/16
10.0.0.0/16 |              | 10.0.0.0/24; 100.64.0.0/16          | 100.65.0.0/24; 100.64.0.0/16
10.0.0.0/16 | 100.64.0.0/16 | 10.0.0.0/24                        | 100.65.0.0/24
fd00::/64   |              | fd00::/64 10.1.0.0/16               | fd63:6175:7365::/64 10.1.0.0/16
fd00::/64   |              | fd00::/64; fd00::/64                | fd63:6175:7365::/64; fd63:6175:7365:1::/64
fd00::/48   |              | fd00::/48                           | fd63:6175:7365::/48
fd00::/48   |              | fd00::/40                           | fd63:6175:7365::/40!
fd00::1/128 |              | fd00::1/128                         | fd63:6175:7365::/128
"#;

    #[test]
    fn allocation_table() {
        for case in TABLE.lines().skip(1) {
            let [local, reserved, peers, expected] = case.split('|').collect::<Vec<_>>()[..] else {
                panic!("bad case {case:?}")
            };
            let keys = [KEY_A, KEY_B, KEY_C];
            let peers: Vec<(&str, &str, &str)> = peers
                .split(';')
                .enumerate()
                .map(|(i, c)| (["a", "b", "c"][i], keys[i], c.trim()))
                .collect();
            let result = run(
                local,
                reserved,
                &default_pool(),
                &peers,
                &Persisted::default(),
            );
            let expected = expected.trim();
            if expected.ends_with('!') {
                let errors = result.err().unwrap_or_else(|| panic!("accepted {case}"));
                assert_eq!(errors.len(), 1, "{case}");
                assert_eq!(errors[0].shortage, Shortage::TooSmall, "{case}");
                continue;
            }
            let (views, _) = result.unwrap_or_else(|e| panic!("{case}: {e:?}"));
            let expected: Vec<&str> = expected.split(';').map(str::trim).collect();
            assert_eq!(shown(&views), expected, "{case}");
        }
    }

    #[test]
    fn remapped_views_are_aligned_same_size_and_inside_the_pool() {
        let pool = default_pool();
        // Many peers of various sizes, all overlapping the local network.
        let cidrs = [
            "10.0.0.0/24",
            "10.0.0.0/16",
            "10.0.0.0/30",
            "10.0.0.0/20",
            "10.0.0.0/32",
            "10.0.0.0/12",
            "10.0.0.0/17",
        ];
        let keys: Vec<String> = (0..cidrs.len()).map(|i| format!("key{i}")).collect();
        let peers: Vec<(&str, &str, &str)> = cidrs
            .iter()
            .zip(&keys)
            .map(|(c, k)| ("p", k.as_str(), *c))
            .collect();
        let (views, state) = run("10.0.0.0/8", "", &pool, &peers, &Persisted::default()).unwrap();
        let all: Vec<View> = views.into_iter().flatten().collect();
        for (i, v) in all.iter().enumerate() {
            assert!(v.is_remapped(), "{v}");
            assert_eq!(v.view().prefix_len(), v.real().prefix_len(), "{v}");
            assert_eq!(*v.view(), v.view().trunc(), "aligned: {v}");
            assert!(pool[0].contains(v.view()), "{v}");
            for w in &all[..i] {
                assert!(!overlaps(v.view(), w.view()), "{v} and {w}");
            }
        }
        assert_eq!(state.views.len(), cidrs.len());
    }

    #[test]
    fn three_sites_with_the_same_network() {
        let pool = default_pool();
        // Each site uses 10.0.0.0/16 and sees its two peers remapped.
        let sites = [("a", KEY_A), ("b", KEY_B), ("c", KEY_C)];
        for (i, _) in sites.iter().enumerate() {
            let peers: Vec<(&str, &str, &str)> = sites
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, &(name, key))| (name, key, "10.0.0.0/16"))
                .collect();
            let (views, _) = run("10.0.0.0/16", "", &pool, &peers, &Persisted::default()).unwrap();
            assert_eq!(shown(&views), ["100.64.0.0/16", "100.65.0.0/16"]);
            assert!(
                views
                    .iter()
                    .flatten()
                    .all(|v| *v.real() == net("10.0.0.0/16"))
            );
        }
    }

    #[test]
    fn persisted_views_survive_reordering_and_new_peers() {
        let pool = default_pool();
        let first = [("a", KEY_A, "10.1.0.0/16"), ("b", KEY_B, "10.1.0.0/16")];
        let (views, state) = run("10.0.0.0/16", "", &pool, &first, &Persisted::default()).unwrap();
        assert_eq!(shown(&views), ["10.1.0.0/16", "100.64.0.0/16"]);
        // Identity views are persisted too.
        assert_eq!(state.views.len(), 2);

        // Reordered: b listed first keeps 100.64.0.0/16, a keeps its real CIDR.
        let reordered = [first[1], first[0]];
        let (views, again) = run("10.0.0.0/16", "", &pool, &reordered, &state).unwrap();
        assert_eq!(shown(&views), ["100.64.0.0/16", "10.1.0.0/16"]);
        assert_eq!(again, state);

        // A new overlapping peer listed before the old ones gets a new view;
        // nobody else moves.
        let grown = [("c", KEY_C, "10.1.0.0/16"), first[1], first[0]];
        let (views, grown_state) = run("10.0.0.0/16", "", &pool, &grown, &state).unwrap();
        assert_eq!(
            shown(&views),
            ["100.65.0.0/16", "100.64.0.0/16", "10.1.0.0/16"]
        );
        assert_eq!(grown_state.views.len(), 3);

        // Without the state, the order would decide (and renumber).
        let (fresh, _) = run("10.0.0.0/16", "", &pool, &grown, &Persisted::default()).unwrap();
        assert_eq!(
            shown(&fresh),
            ["10.1.0.0/16", "100.64.0.0/16", "100.65.0.0/16"]
        );

        // Through JSON, the state is the same.
        let text = grown_state.to_json();
        assert_eq!(Persisted::from_json(&text).unwrap(), grown_state);
        assert!(text.contains("\"public_key\""), "{text}");
    }

    #[test]
    fn stale_and_invalid_entries_are_dropped() {
        let pool = default_pool();
        let peers = [("a", KEY_A, "10.0.0.0/16"), ("b", KEY_B, "10.2.0.0/16")];
        let (_, state) = run("10.0.0.0/16", "", &pool, &peers, &Persisted::default()).unwrap();
        assert_eq!(state.views.len(), 2);

        // b's CIDR changed and a was removed: their entries go.
        let changed = [("b", KEY_B, "10.3.0.0/16")];
        let (views, after) = run("10.0.0.0/16", "", &pool, &changed, &state).unwrap();
        assert_eq!(shown(&views), ["10.3.0.0/16"]);
        assert_eq!(
            after.views,
            [PersistedView {
                peer: "b".into(),
                public_key: KEY_B.into(),
                real: net("10.3.0.0/16"),
                view: net("10.3.0.0/16"),
            }]
        );

        // An entry that now collides with a local network, one outside the
        // pool and one of the wrong size are not honoured.
        let bad = Persisted {
            views: vec![
                entry(KEY_A, "10.1.0.0/16", "10.1.0.0/16"),
                entry(KEY_B, "10.0.0.0/16", "10.200.0.0/16"),
                entry(KEY_C, "10.0.0.0/16", "100.70.0.0/24"),
            ],
        };
        let peers = [
            ("a", KEY_A, "10.1.0.0/16"),
            ("b", KEY_B, "10.0.0.0/16"),
            ("c", KEY_C, "10.0.0.0/16"),
        ];
        let (views, _) = run("10.0.0.0/15", "", &pool, &peers, &bad).unwrap();
        assert_eq!(
            shown(&views),
            ["100.64.0.0/16", "100.65.0.0/16", "100.66.0.0/16"]
        );

        // Two entries whose views collide: the first is kept.
        let clash = Persisted {
            views: vec![
                entry(KEY_C, "10.0.0.0/16", "100.64.0.0/16"),
                entry(KEY_B, "10.0.0.0/16", "100.64.0.0/16"),
            ],
        };
        let (views, _) = run("10.0.0.0/16", "", &pool, &peers[1..], &clash).unwrap();
        assert_eq!(shown(&views), ["100.65.0.0/16", "100.64.0.0/16"]);
    }

    fn entry(key: &str, real: &str, view: &str) -> PersistedView {
        PersistedView {
            peer: String::new(),
            public_key: key.into(),
            real: net(real),
            view: net(view),
        }
    }

    #[test]
    fn pool_exhaustion_and_missing_family_are_errors() {
        let pool = nets("100.64.0.0/23");
        let peers = [
            ("a", KEY_A, "10.0.0.0/24"),
            ("b", KEY_B, "10.0.0.0/24"),
            ("c", KEY_C, "10.0.0.0/24 fd00::/64"),
        ];
        let errors = run(
            "10.0.0.0/16 fd00::/48",
            "",
            &pool,
            &peers,
            &Persisted::default(),
        )
        .err()
        .unwrap();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!((errors[0].peer, errors[0].cidr), (2, 0));
        assert_eq!(errors[0].shortage, Shortage::Exhausted);
        assert_eq!(
            errors[0].to_string(),
            "10.0.0.0/24 overlaps site.pod_cidrs[0] 10.0.0.0/16, so it needs a view from site.remap_pool, but its IPv4 CIDRs have no free /24 left; add another IPv4 CIDR to remap_pool"
        );
        assert_eq!((errors[1].peer, errors[1].cidr), (2, 1));
        assert_eq!(errors[1].shortage, Shortage::NoFamily);
        assert_eq!(
            errors[1].to_string(),
            "fd00::/64 overlaps site.pod_cidrs[1] fd00::/48, so it needs a view from site.remap_pool, but remap_pool has no IPv6 CIDR; add one, e.g. \"fd63:6175:7365::/48\""
        );

        // Another peer's view is named as the conflict.
        let peers = [("a", KEY_A, "10.1.0.0/16"), ("b", KEY_B, "10.1.0.0/16")];
        let errors = run("10.0.0.0/16", "", &[], &peers, &Persisted::default())
            .err()
            .unwrap();
        assert_eq!(
            errors[0].conflict,
            "overlaps the view 10.1.0.0/16 of peer \"a\""
        );
        let errors = run(
            "10.0.0.0/16",
            "10.1.0.0/16",
            &[],
            &peers,
            &Persisted::default(),
        )
        .err()
        .unwrap();
        assert_eq!(errors.len(), 2);
        assert_eq!(
            errors[0].conflict,
            "overlaps site.reserved_cidrs[0] 10.1.0.0/16"
        );
    }

    #[test]
    fn ipv6_views_come_from_the_ula_pool() {
        let peers = [
            ("a", KEY_A, "fd00:10::/64"),
            ("b", KEY_B, "fd00:10::/64"),
            ("c", KEY_C, "fd00:10::/64"),
        ];
        let (views, _) = run(
            "fd00:10::/64",
            "",
            &default_pool(),
            &peers,
            &Persisted::default(),
        )
        .unwrap();
        assert_eq!(
            shown(&views),
            [
                "fd63:6175:7365::/64",
                "fd63:6175:7365:1::/64",
                "fd63:6175:7365:2::/64"
            ]
        );
        let errors = run(
            "fd00:10::/64",
            "",
            &nets("100.64.0.0/10"),
            &peers[..1],
            &Persisted::default(),
        )
        .err()
        .unwrap();
        assert_eq!(errors[0].shortage, Shortage::NoFamily);
    }

    #[test]
    fn allocation_skips_taken_blocks_without_walking_them() {
        // A /128 in a /48 pool whose first /64 is reserved: the search jumps
        // over the reserved block instead of counting through 2^64 addresses.
        let (views, _) = run(
            "fd00::1/128",
            "fd63:6175:7365::/64",
            &default_pool(),
            &[("a", KEY_A, "fd00::1/128")],
            &Persisted::default(),
        )
        .unwrap();
        assert_eq!(shown(&views), ["fd63:6175:7365:1::/128"]);
        // The last block of the whole IPv6 space, then nothing.
        let top = nets("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127");
        let peers = [("a", KEY_A, "fd00::/127"), ("b", KEY_B, "fd00::/127")];
        let errors = run("fd00::/64", "", &top, &peers, &Persisted::default())
            .err()
            .unwrap();
        assert_eq!((errors.len(), errors[0].peer), (1, 1));
        assert_eq!(errors[0].shortage, Shortage::Exhausted);
    }

    #[test]
    fn state_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/sub/views.json");
        assert_eq!(Persisted::load(&path).unwrap(), Persisted::default());
        let state = Persisted {
            views: vec![entry(KEY_A, "10.0.0.0/16", "100.64.0.0/16")],
        };
        state.save(&path).unwrap();
        state.save(&path).unwrap();
        assert_eq!(Persisted::load(&path).unwrap(), state);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // Only the state file is left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["views.json"]);

        fs::write(&path, "{\"version\": 2, \"views\": []}").unwrap();
        let err = Persisted::load(&path).err().unwrap().to_string();
        assert!(err.contains("version 2 is not supported"), "{err}");
        fs::write(&path, "not json").unwrap();
        let err = Persisted::load(&path).err().unwrap().to_string();
        assert!(err.contains("is not a valid views file"), "{err}");
        assert!(err.contains("move it away"), "{err}");
    }
}
