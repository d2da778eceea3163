//! Mutual authentication of a site and a rendezvous, bound to the TLS
//! session of their QUIC connection. Pure functions; see docs/rendezvous.md
//! for the construction and the threat model.
//!
//! ```text
//! exporter = TLS-Exporter("EXPORTER-causeway-rendezvous-v1", context "", 32)
//! shared   = X25519(site_secret, rendezvous_public) = X25519(rendezvous_secret, site_public)
//! key      = BLAKE2s-256(key = shared, "causeway-rendezvous-v1 auth key")
//! proof_r  = BLAKE2s-256-MAC(key, label_r || exporter || site_public || rendezvous_public)
//! ```
//! with `label_site = "causeway-rendezvous-v1 site proof"` and
//! `label_rendezvous = "causeway-rendezvous-v1 rendezvous proof"`. The labels
//! differ in length and every other field has a fixed length, so no two
//! inputs encode alike.

use blake2::Blake2sMac256;
use blake2::digest::{FixedOutput, KeyInit, Update};
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey, StaticSecret};

/// The TLS exporter label both ends feed to `export_keying_material`.
pub(crate) const EXPORTER_LABEL: &[u8] = b"EXPORTER-causeway-rendezvous-v1";
/// The TLS exporter context (empty).
pub(crate) const EXPORTER_CONTEXT: &[u8] = b"";

const KEY_LABEL: &[u8] = b"causeway-rendezvous-v1 auth key";
const SITE_LABEL: &[u8] = b"causeway-rendezvous-v1 site proof";
const RENDEZVOUS_LABEL: &[u8] = b"causeway-rendezvous-v1 rendezvous proof";

/// 32 bytes exported from the TLS session.
pub(crate) type Exporter = [u8; 32];
/// A proof of key possession for one session.
pub(crate) type Proof = [u8; 32];

/// Which side a proof speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The site proves its WireGuard key.
    Site,
    /// The rendezvous proves its own key.
    Rendezvous,
}

/// The MAC key shared by one site and one rendezvous. Not `Debug`; wiped
/// when dropped.
pub(crate) struct AuthKey([u8; 32]);

impl Drop for AuthKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl AuthKey {
    /// Derives the key from our secret and the other side's public key;
    /// `None` if the Diffie-Hellman result is not contributory (the public
    /// key is a low-order point, which would make the key predictable).
    pub(crate) fn derive(own: &StaticSecret, other: &PublicKey) -> Option<Self> {
        let shared = own.diffie_hellman(other);
        if !shared.was_contributory() {
            return None;
        }
        Some(Self(mac(shared.as_bytes(), &[KEY_LABEL])))
    }

    /// The proof `role` sends on the session identified by `exporter`.
    pub(crate) fn proof(
        &self,
        role: Role,
        exporter: &Exporter,
        site: &PublicKey,
        rendezvous: &PublicKey,
    ) -> Proof {
        let label = match role {
            Role::Site => SITE_LABEL,
            Role::Rendezvous => RENDEZVOUS_LABEL,
        };
        mac(
            &self.0,
            &[label, exporter, site.as_bytes(), rendezvous.as_bytes()],
        )
    }

    /// Whether `proof` is the one `role` should have sent on this session
    /// (constant-time comparison).
    pub(crate) fn verify(
        &self,
        role: Role,
        exporter: &Exporter,
        site: &PublicKey,
        rendezvous: &PublicKey,
        proof: &Proof,
    ) -> bool {
        let expected = self.proof(role, exporter, site, rendezvous);
        bool::from(expected.ct_eq(proof))
    }
}

fn mac(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = Blake2sMac256::new(key.into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize_fixed().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair(seed: u8) -> (StaticSecret, PublicKey) {
        let secret = StaticSecret::from([seed; 32]);
        let public = PublicKey::from(&secret);
        (secret, public)
    }

    #[test]
    fn both_ends_derive_the_same_proofs() {
        let (site_secret, site) = keypair(1);
        let (rdv_secret, rdv) = keypair(2);
        let exporter = [7u8; 32];
        let at_site = AuthKey::derive(&site_secret, &rdv).unwrap();
        let at_rdv = AuthKey::derive(&rdv_secret, &site).unwrap();
        for role in [Role::Site, Role::Rendezvous] {
            let proof = at_site.proof(role, &exporter, &site, &rdv);
            assert!(at_rdv.verify(role, &exporter, &site, &rdv, &proof));
        }
        // The two roles' proofs differ: no reflection.
        let site_proof = at_site.proof(Role::Site, &exporter, &site, &rdv);
        assert!(!at_rdv.verify(Role::Rendezvous, &exporter, &site, &rdv, &site_proof));
    }

    #[test]
    fn proofs_are_bound_to_session_and_keys() {
        let (site_secret, site) = keypair(1);
        let (rdv_secret, rdv) = keypair(2);
        let (other_secret, other_rdv) = keypair(3);
        let key = AuthKey::derive(&site_secret, &rdv).unwrap();
        let proof = key.proof(Role::Site, &[7; 32], &site, &rdv);
        let at_rdv = AuthKey::derive(&rdv_secret, &site).unwrap();
        // Another session (a man in the middle has a different exporter).
        assert!(!at_rdv.verify(Role::Site, &[8; 32], &site, &rdv, &proof));
        // Another rendezvous key.
        let at_other = AuthKey::derive(&other_secret, &site).unwrap();
        assert!(!at_other.verify(Role::Site, &[7; 32], &site, &other_rdv, &proof));
        // A site claiming another key.
        let (_, mallory) = keypair(4);
        let at_rdv_m = AuthKey::derive(&rdv_secret, &mallory).unwrap();
        assert!(!at_rdv_m.verify(Role::Site, &[7; 32], &mallory, &rdv, &proof));
    }

    #[test]
    fn low_order_public_keys_are_refused() {
        let (secret, _) = keypair(1);
        assert!(AuthKey::derive(&secret, &PublicKey::from([0u8; 32])).is_none());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(AuthKey::derive(&secret, &PublicKey::from(one)).is_none());
    }

    #[test]
    fn mac_is_keyed_blake2s() {
        // First keyed BLAKE2s-256 vector of the reference blake2s-kat.txt:
        // key 00..1f, empty message.
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let expected = "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49";
        let got: String = mac(&key, &[]).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, expected);
        assert_ne!(mac(&[0; 32], &[b"abc"]), mac(&[1; 32], &[b"abc"]));
        assert_eq!(mac(&[0; 32], &[b"ab", b"c"]), mac(&[0; 32], &[b"abc"]));
    }
}
