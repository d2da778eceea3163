//! The text `causeway join` appends to a config file: a `[[peer]]` table
//! for the token's site and a `[[rendezvous]]` table for each of its
//! rendezvous servers the file does not pin yet, validated with
//! [`config::parse`] before anything is written. Pure.
//!
//! Three walls keep a token's text from becoming anything but the values
//! of the new tables: the invite is checked ([`Invite::check`]) even when
//! it did not come from [`Invite::decode`]; every value is written as a
//! one-line TOML basic string with quotes, backslashes and control
//! characters escaped ([`quote`]), and comments hold only escaped text;
//! and the parsed result must hold exactly the file's previous peers and
//! rendezvous plus the new ones ([`check_appended`]).

use std::path::PathBuf;

use causeway_common::problems::valid_name;

use super::{Invite, InviteRendezvous, JoinError, TokenError};
use crate::config::{self, Config, Parsed, PeerConfig, RendezvousConfig};
use crate::keys::{self, PublicKey};

/// The file's text with the peer (and rendezvous) appended, validated.
#[derive(Debug)]
pub(super) struct Appended {
    pub(super) text: String,
    pub(super) config: Config<Parsed>,
    pub(super) rendezvous_added: Vec<InviteRendezvous>,
    pub(super) rendezvous_known: Vec<InviteRendezvous>,
}

/// Appends `theirs` to `text` (whose parsed form is `current`) and checks
/// the result; pure.
pub(super) fn append_peer(
    text: &str,
    origin: &str,
    current: &Config<Parsed>,
    own: &PublicKey,
    theirs: &Invite,
    name: Option<&str>,
) -> Result<Appended, JoinError> {
    theirs.check().map_err(|refusal| TokenError::Invalid {
        field: refusal.field,
        reason: refusal.reason,
    })?;
    if let Some(name) = name.filter(|name| !valid_name(name)) {
        return Err(JoinError::Name {
            name: name.to_owned(),
        });
    }
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
        format!(" (site {})", theirs.site.escape_default())
    };
    out += &format!(
        "# Peer {}{renamed}, added by `causeway join`.\n[[peer]]\n",
        name.escape_default()
    );
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
        out += &format!(
            "\n# Rendezvous of {}, added by `causeway join`.\n[[rendezvous]]\n",
            name.escape_default()
        );
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
    check_appended(current, &config, name, theirs, &rendezvous_added).map_err(|why| {
        JoinError::NotJustThePeer {
            path: PathBuf::from(origin),
            name: name.to_owned(),
            why,
        }
    })?;
    Ok(Appended {
        text: out,
        config,
        rendezvous_added,
        rendezvous_known,
    })
}

/// Whether `after` (the file with the text appended, parsed) holds exactly
/// `before` plus the peer `name` of `theirs` and the rendezvous `added`:
/// the same site, the same peers and rendezvous first, then only the new
/// ones, with the values of the token. On error, what else would change.
pub(super) fn check_appended(
    before: &Config<Parsed>,
    after: &Config<Parsed>,
    name: &str,
    theirs: &Invite,
    added: &[InviteRendezvous],
) -> Result<(), String> {
    // `SiteConfig` has no `PartialEq` (a loaded one holds the private key);
    // a parsed one's `Debug` shows every field.
    if format!("{:?}", before.site) != format!("{:?}", after.site) {
        return Err("change the [site] table".into());
    }
    let names = |peers: &[PeerConfig<Parsed>]| -> Vec<String> {
        peers.iter().map(|p| p.name.clone()).collect()
    };
    let endpoint = match theirs.endpoints.first() {
        Some(spec) => Some(
            config::parse_endpoint(spec)
                .map_err(|why| format!("have endpoint {spec:?}, which {why}"))?,
        ),
        None => None,
    };
    let expected = PeerConfig {
        name: name.to_owned(),
        public_key: theirs.public_key,
        cidrs: theirs.pod_cidrs.clone(),
        views: (),
        allow: Vec::new(),
        endpoint,
        persistent_keepalive: None,
    };
    match after.peers.split_last() {
        Some((new, old)) if old == before.peers.as_slice() && *new == expected => {}
        _ => {
            return Err(format!(
                "hold the peers {:?} instead of {:?} and {name:?}",
                names(&after.peers),
                names(&before.peers)
            ));
        }
    }
    let mut expected = before.rendezvous.clone();
    for r in added {
        let address = config::parse_endpoint(&r.address)
            .map_err(|why| format!("have rendezvous address {:?}, which {why}", r.address))?;
        let stun = r
            .stun
            .clone()
            .unwrap_or_else(|| config::default_stun(&address));
        let stun = config::parse_endpoint(&stun)
            .map_err(|why| format!("have rendezvous STUN address {stun:?}, which {why}"))?;
        let tcp = config::parse_endpoint(&config::default_tcp(&address))
            .map_err(|why| format!("have rendezvous TCP address, which {why}"))?;
        expected.push(RendezvousConfig {
            address,
            public_key: r.public_key,
            stun,
            tcp: Some(tcp),
        });
    }
    if after.rendezvous != expected {
        return Err(format!(
            "hold {} [[rendezvous]] tables instead of {} (or other values than the token's)",
            after.rendezvous.len(),
            expected.len()
        ));
    }
    Ok(())
}

/// `s` as a TOML basic string on one line: `"` and `\` escaped, and every
/// control character (newlines included) written as `\uXXXX`, so that no
/// value can end its string, its line or its table.
pub(super) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out += &format!("\\u{:04X}", u32::from(c)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::super::fixtures::*;
    use super::*;

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

        // A --name the config does not take is refused before anything
        // is written, and never reaches the file's text.
        theirs.public_key = key(KEY_R);
        for bad in ["Bad Name", "", "a\n[[peer]]", &"a".repeat(33)] {
            let err =
                append_peer(&text, "c.toml", &config, &key(KEY_A), &theirs, Some(bad)).unwrap_err();
            assert!(
                matches!(&err, JoinError::Name { name } if name == bad),
                "{err:?}"
            );
            assert!(
                err.to_string()
                    .contains("use 1 to 32 characters from a-z, 0-9 and '-'"),
                "{err}"
            );
        }
    }
}
