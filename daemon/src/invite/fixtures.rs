//! What the tests of the invite module share: keys, a sample invite, a
//! site's config file.

#![allow(clippy::unwrap_used)] // tests may panic

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{Invite, InviteRendezvous};
use crate::keys::{self, PublicKey};

pub(super) const KEY_A: &str = "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk=";
pub(super) const KEY_B: &str = "ZkgvCW+DIoRG24ZST7MmKM5j/X9m/LO8XA0qLN0Fxm0=";
pub(super) const KEY_R: &str = "Uxw5597LYTGBKqnK/Jz6KjYh2ZodZF4sbhwR6zaqX2E=";

pub(super) fn key(text: &str) -> PublicKey {
    keys::decode_public(text).unwrap()
}

pub(super) fn sample() -> Invite {
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
pub(super) fn json_of(token: &str) -> serde_json::Value {
    let body = token.strip_prefix("cw1.").unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap()
}

pub(super) fn token_of(json: &str) -> String {
    format!("cw1.{}", URL_SAFE_NO_PAD.encode(json))
}

pub(super) fn site_config(dir: &Path, extra_site: &str, rest: &str) -> String {
    format!(
        "[site]\nname = \"hospital\"\nprivate_key_file = {:?}\nstate_dir = {:?}\npod_cidrs = [\"10.0.0.0/16\"]\n{extra_site}\n{rest}",
        dir.join("private.key").display().to_string(),
        dir.join("state").display().to_string(),
    )
}
