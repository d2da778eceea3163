//! What `causeway join` tells the operator.

use super::Joined;
use crate::keys;
use crate::packet::View;

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
