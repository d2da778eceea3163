//! The rendezvous' view of connected sites: who is registered, who is
//! introduced to whom, and which relay pairs are allowed. No I/O: every
//! change returns the `PeerUpdate`s to send.
//!
//! Two sites are *mutual* when both are connected and registered, each
//! lists the other in its peers, and they are different sites. Only mutual
//! sites hear about each other (introductions) and only they may relay to
//! each other; a site never learns anything about a site that does not
//! list it, not even whether it is connected.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

/// A connection, as numbered by the server.
pub type ConnId = u64;
/// A site's public key bytes.
pub type SiteKey = [u8; 32];

/// A `PeerUpdate` to send on connection `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub to: ConnId,
    pub peer: SiteKey,
    pub relay_id: u32,
    pub candidates: Vec<SocketAddr>,
    pub online: bool,
    /// The pair's relay port and the recipient's token for it, while the
    /// rendezvous keeps one for the two (see [`Registry::grant_relay_port`]).
    pub relay: Option<RelayGrant>,
}

/// A relay port of a pair of mutual sites, as told to one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayGrant {
    /// The UDP port, on the rendezvous' address.
    pub port: u16,
    /// The recipient's token (see [`crate::udp_relay`]).
    pub token: [u8; 32],
}

/// Two site keys in byte order: a pair, whichever side names it.
pub type PairKey = (SiteKey, SiteKey);

/// The pair of two keys, in byte order.
pub(super) fn pair_key(a: SiteKey, b: SiteKey) -> PairKey {
    if a <= b { (a, b) } else { (b, a) }
}

/// What a site's request for a relay port to a peer comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayRequest {
    /// The two are not mutual peers (or the requester is unknown): refused.
    NotAuthorized,
    /// The pair has a port already: these updates tell the requester again.
    Existing(Vec<Update>),
    /// The pair has none: the caller binds one and calls
    /// [`Registry::grant_relay_port`] with this pair.
    New(PairKey),
}

/// A pair's relay port and the two tokens, in the pair's key order.
#[derive(Debug, Clone, Copy)]
struct PortEntry {
    port: u16,
    tokens: [[u8; 32]; 2],
}

/// Relay counters of one site (cumulative over its connections).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayCounters {
    /// WireGuard packets forwarded from this site (counted once per packet,
    /// at its first fragment).
    pub packets: u64,
    /// Payload bytes forwarded from this site (relay headers excluded).
    pub bytes: u64,
    /// Datagrams from this site dropped: unknown destination, not a mutual
    /// peer, or malformed.
    pub dropped: u64,
}

struct Session {
    key: SiteKey,
    relay_id: u32,
    /// `None` until the first `Register`.
    peers: Option<HashSet<SiteKey>>,
    candidates: Vec<SocketAddr>,
}

/// Why a relay datagram is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// The sender is not an authenticated connection.
    UnknownSender,
    /// No connected site has that relay id.
    UnknownDestination,
    /// The two sites are not mutual peers.
    NotAuthorized,
}

/// The sites the rendezvous serves and the connected ones.
pub struct Registry {
    /// Configured sites: key → name.
    allowed: HashMap<SiteKey, String>,
    sessions: HashMap<ConnId, Session>,
    by_key: HashMap<SiteKey, ConnId>,
    by_relay: HashMap<u32, ConnId>,
    next_relay_id: u32,
    counters: HashMap<SiteKey, RelayCounters>,
    /// Relay ports of mutual pairs.
    ports: HashMap<PairKey, PortEntry>,
    /// Ports of pairs that stopped being mutual, for the caller to close.
    freed: Vec<u16>,
}

impl Registry {
    /// A registry for the configured `(key, name)` sites; relay ids are
    /// handed out from `first_relay_id` on (never 0).
    pub fn new(sites: impl IntoIterator<Item = (SiteKey, String)>, first_relay_id: u32) -> Self {
        Self {
            allowed: sites.into_iter().collect(),
            sessions: HashMap::new(),
            by_key: HashMap::new(),
            by_relay: HashMap::new(),
            next_relay_id: first_relay_id.max(1),
            counters: HashMap::new(),
            ports: HashMap::new(),
            freed: Vec::new(),
        }
    }

    /// The configured name of a site key, if the rendezvous serves it.
    pub fn site_name(&self, key: &SiteKey) -> Option<&str> {
        self.allowed.get(key).map(String::as_str)
    }

    /// The configured sites, with their names.
    pub fn sites(&self) -> impl Iterator<Item = (&SiteKey, &str)> {
        self.allowed.iter().map(|(k, n)| (k, n.as_str()))
    }

    /// Whether the site is connected now.
    pub fn is_connected(&self, key: &SiteKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// The connection of a site, while it is connected.
    pub fn connection(&self, key: &SiteKey) -> Option<ConnId> {
        self.by_key.get(key).copied()
    }

    /// Relay counters of a site.
    pub fn counters(&self, key: &SiteKey) -> RelayCounters {
        self.counters.get(key).copied().unwrap_or_default()
    }

    /// An authenticated site connected on `conn`. Returns its relay id, the
    /// older connection of the same site that this one replaces (the caller
    /// closes it), and the updates that replacing it causes.
    pub fn connect(&mut self, conn: ConnId, key: SiteKey) -> (u32, Option<ConnId>, Vec<Update>) {
        let mut updates = Vec::new();
        let replaced = self.by_key.get(&key).copied();
        if let Some(old) = replaced {
            updates = self.disconnect(old);
        }
        let relay_id = self.allocate_relay_id();
        self.sessions.insert(
            conn,
            Session {
                key,
                relay_id,
                peers: None,
                candidates: Vec::new(),
            },
        );
        self.by_key.insert(key, conn);
        self.by_relay.insert(relay_id, conn);
        (relay_id, replaced, updates)
    }

    fn allocate_relay_id(&mut self) -> u32 {
        loop {
            let id = self.next_relay_id;
            self.next_relay_id = self.next_relay_id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.by_relay.contains_key(&id) {
                return id;
            }
        }
    }

    fn mutual(&self, a: &Session, b: &Session) -> bool {
        a.key != b.key
            && a.peers.as_ref().is_some_and(|p| p.contains(&b.key))
            && b.peers.as_ref().is_some_and(|p| p.contains(&a.key))
    }

    /// The connections mutual with `conn`.
    fn mutual_peers(&self, conn: ConnId) -> Vec<ConnId> {
        let Some(me) = self.sessions.get(&conn) else {
            return Vec::new();
        };
        let Some(peers) = &me.peers else {
            return Vec::new();
        };
        peers
            .iter()
            .filter_map(|k| self.by_key.get(k).copied())
            .filter(|c| {
                self.sessions
                    .get(c)
                    .is_some_and(|other| self.mutual(me, other))
            })
            .collect()
    }

    fn update_about(&self, to: ConnId, about: ConnId, online: bool) -> Option<Update> {
        let s = self.sessions.get(&about)?;
        let recipient = self.sessions.get(&to)?.key;
        let relay = online.then(|| self.grant_for(recipient, s.key)).flatten();
        Some(Update {
            to,
            peer: s.key,
            relay_id: s.relay_id,
            candidates: if online {
                s.candidates.clone()
            } else {
                Vec::new()
            },
            online,
            relay,
        })
    }

    /// The relay port of `me` and `peer`, with `me`'s token.
    fn grant_for(&self, me: SiteKey, peer: SiteKey) -> Option<RelayGrant> {
        let pair = pair_key(me, peer);
        let entry = self.ports.get(&pair)?;
        let side = usize::from(pair.0 != me);
        Some(RelayGrant {
            port: entry.port,
            token: entry.tokens[side],
        })
    }

    /// Site `from` asks for a relay port to `peer`.
    pub fn request_relay_port(&self, from: ConnId, peer: &SiteKey) -> RelayRequest {
        let Some(me) = self.sessions.get(&from) else {
            return RelayRequest::NotAuthorized;
        };
        let Some((&other, session)) = self
            .by_key
            .get(peer)
            .and_then(|c| Some((c, self.sessions.get(c)?)))
        else {
            return RelayRequest::NotAuthorized;
        };
        if !self.mutual(me, session) {
            return RelayRequest::NotAuthorized;
        }
        let pair = pair_key(me.key, *peer);
        if self.ports.contains_key(&pair) {
            RelayRequest::Existing(self.update_about(from, other, true).into_iter().collect())
        } else {
            RelayRequest::New(pair)
        }
    }

    /// Records the port the caller bound for `pair` (from
    /// [`RelayRequest::New`]), with one token per site in the pair's key
    /// order; returns the updates that tell both sites. If the pair is
    /// not mutual any more, or has a port already, nothing is recorded and
    /// the port is handed back through [`Self::take_freed_ports`].
    pub fn grant_relay_port(
        &mut self,
        pair: PairKey,
        port: u16,
        tokens: [[u8; 32]; 2],
    ) -> Vec<Update> {
        let conns = (
            self.by_key.get(&pair.0).copied(),
            self.by_key.get(&pair.1).copied(),
        );
        let (Some(a), Some(b)) = conns else {
            self.freed.push(port);
            return Vec::new();
        };
        let mutual = match (self.sessions.get(&a), self.sessions.get(&b)) {
            (Some(x), Some(y)) => self.mutual(x, y),
            _ => false,
        };
        if !mutual || self.ports.contains_key(&pair) {
            self.freed.push(port);
            return Vec::new();
        }
        self.ports.insert(pair, PortEntry { port, tokens });
        [(a, b), (b, a)]
            .into_iter()
            .filter_map(|(to, about)| self.update_about(to, about, true))
            .collect()
    }

    /// The relay port `port` of `pair` closed by itself (unused for a
    /// while): forgets it and returns the updates that tell both sites
    /// (without a port). Nothing if the pair has another port by now.
    pub fn release_relay_port(&mut self, pair: PairKey, port: u16) -> Vec<Update> {
        if self.ports.get(&pair).is_none_or(|e| e.port != port) {
            return Vec::new();
        }
        self.ports.remove(&pair);
        let (Some(&a), Some(&b)) = (self.by_key.get(&pair.0), self.by_key.get(&pair.1)) else {
            return Vec::new();
        };
        [(a, b), (b, a)]
            .into_iter()
            .filter_map(|(to, about)| self.update_about(to, about, true))
            .collect()
    }

    /// Ports whose pair stopped being mutual (a site left, or dropped the
    /// other from its peers) since the last call: the caller closes them.
    pub fn take_freed_ports(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.freed)
    }

    /// Drops the ports of `key`'s pairs that are not mutual any more.
    fn free_stale_ports(&mut self, key: SiteKey) {
        let stale: Vec<PairKey> = self
            .ports
            .keys()
            .filter(|(a, b)| *a == key || *b == key)
            .filter(|(a, b)| {
                let session = |k: &SiteKey| self.by_key.get(k).and_then(|c| self.sessions.get(c));
                !matches!((session(a), session(b)), (Some(x), Some(y)) if self.mutual(x, y))
            })
            .copied()
            .collect();
        for pair in stale {
            if let Some(entry) = self.ports.remove(&pair) {
                self.freed.push(entry.port);
            }
        }
    }

    /// The site on `conn` (re)registered its peers and candidates.
    pub fn register(
        &mut self,
        conn: ConnId,
        peers: impl IntoIterator<Item = SiteKey>,
        candidates: Vec<SocketAddr>,
    ) -> Vec<Update> {
        let before: HashSet<ConnId> = self.mutual_peers(conn).into_iter().collect();
        let Some(me) = self.sessions.get_mut(&conn) else {
            return Vec::new();
        };
        me.peers = Some(peers.into_iter().collect());
        me.candidates = candidates;
        let me_key = me.key;
        let after: HashSet<ConnId> = self.mutual_peers(conn).into_iter().collect();
        if before.difference(&after).next().is_some() {
            self.free_stale_ports(me_key);
        }

        let mut updates = Vec::new();
        let mut gone: Vec<_> = before.difference(&after).copied().collect();
        gone.sort_unstable();
        for other in gone {
            updates.extend(self.update_about(conn, other, false));
            updates.extend(self.update_about(other, conn, false));
        }
        // Every registration reaches the mutual peers, changed or not: a
        // site re-registers unchanged candidates on purpose when it lost
        // its direct path, so that the peer checks its own path at once.
        let mut now: Vec<_> = after.iter().copied().collect();
        now.sort_unstable();
        for other in now {
            if !before.contains(&other) {
                updates.extend(self.update_about(conn, other, true));
            }
            updates.extend(self.update_about(other, conn, true));
        }
        updates
    }

    /// The connection `conn` is gone; its mutual peers hear it is offline.
    /// Harmless for a connection that never authenticated or is already gone.
    pub fn disconnect(&mut self, conn: ConnId) -> Vec<Update> {
        let mut peers = self.mutual_peers(conn);
        peers.sort_unstable();
        let updates = peers
            .into_iter()
            .filter_map(|other| self.update_about(other, conn, false))
            .collect();
        if let Some(s) = self.sessions.remove(&conn) {
            if self.by_key.get(&s.key) == Some(&conn) {
                self.by_key.remove(&s.key);
            }
            self.by_relay.remove(&s.relay_id);
            self.free_stale_ports(s.key);
        }
        updates
    }

    /// Where a relay datagram from `from` to relay id `dst` goes: the
    /// destination connection and the sender's relay id to put in its place.
    /// Counts the datagram (`payload` bytes, a packet when `first_fragment`)
    /// for the sender, forwarded or dropped.
    pub fn route(
        &mut self,
        from: ConnId,
        dst: u32,
        payload: usize,
        first_fragment: bool,
    ) -> Result<(ConnId, u32), RouteError> {
        let Some(me) = self.sessions.get(&from) else {
            return Err(RouteError::UnknownSender);
        };
        let result = match self
            .by_relay
            .get(&dst)
            .and_then(|c| Some((*c, self.sessions.get(c)?)))
        {
            None => Err(RouteError::UnknownDestination),
            Some((to, other)) if self.mutual(me, other) => Ok((to, me.relay_id)),
            Some(_) => Err(RouteError::NotAuthorized),
        };
        let counters = self.counters.entry(me.key).or_default();
        if result.is_ok() {
            counters.bytes += payload as u64;
            counters.packets += u64::from(first_fragment);
        } else {
            counters.dropped += 1;
        }
        result
    }

    /// Counts a malformed datagram from `from`.
    pub fn count_malformed(&mut self, from: ConnId) {
        if let Some(me) = self.sessions.get(&from) {
            self.counters.entry(me.key).or_default().dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SiteKey = [1; 32];
    const B: SiteKey = [2; 32];
    const C: SiteKey = [3; 32];

    fn registry() -> Registry {
        Registry::new([(A, "a".into()), (B, "b".into()), (C, "c".into())], 100)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn mutual_pairs_are_introduced_both_ways() {
        let mut r = registry();
        let (ra, _, _) = r.connect(1, A);
        let (rb, _, _) = r.connect(2, B);
        assert_ne!(ra, rb);
        assert!(
            r.register(1, [B], vec![addr(1)]).is_empty(),
            "B has not registered yet"
        );
        let ups = r.register(2, [A], vec![addr(2)]);
        assert_eq!(
            ups,
            vec![
                Update {
                    to: 2,
                    peer: A,
                    relay_id: ra,
                    candidates: vec![addr(1)],
                    online: true,
                    relay: None,
                },
                Update {
                    to: 1,
                    peer: B,
                    relay_id: rb,
                    candidates: vec![addr(2)],
                    online: true,
                    relay: None,
                },
            ]
        );
        // New candidates from A reach B only.
        let ups = r.register(1, [B], vec![addr(3)]);
        assert_eq!(
            ups,
            vec![Update {
                to: 2,
                peer: A,
                relay_id: ra,
                candidates: vec![addr(3)],
                online: true,
                relay: None,
            }]
        );
        // Re-registering the same thing tells B again: a site does that when
        // it lost its direct path, so that the peer checks its own at once.
        assert_eq!(r.register(1, [B], vec![addr(3)]).len(), 1);
        // A disconnects: B hears it.
        assert_eq!(
            r.disconnect(1),
            vec![Update {
                to: 2,
                peer: A,
                relay_id: ra,
                candidates: vec![],
                online: false,
                relay: None,
            }]
        );
        assert!(!r.is_connected(&A));
    }

    #[test]
    fn one_sided_listing_reveals_nothing() {
        let mut r = registry();
        r.connect(1, A);
        r.connect(3, C);
        // C lists A, A lists only B.
        assert!(r.register(3, [A], vec![addr(3)]).is_empty());
        assert!(r.register(1, [B], vec![addr(1)]).is_empty());
        assert!(r.register(1, [B], vec![addr(9)]).is_empty());
        assert!(r.disconnect(3).is_empty());
        assert!(r.disconnect(1).is_empty());
    }

    #[test]
    fn dropping_a_peer_takes_both_offline() {
        let mut r = registry();
        let (ra, _, _) = r.connect(1, A);
        let (rb, _, _) = r.connect(2, B);
        r.register(1, [B], vec![]);
        r.register(2, [A], vec![]);
        let ups = r.register(1, [C], vec![]);
        assert_eq!(
            ups,
            vec![
                Update {
                    to: 1,
                    peer: B,
                    relay_id: rb,
                    candidates: vec![],
                    online: false,
                    relay: None,
                },
                Update {
                    to: 2,
                    peer: A,
                    relay_id: ra,
                    candidates: vec![],
                    online: false,
                    relay: None,
                },
            ]
        );
        assert_eq!(r.route(2, ra, 10, true), Err(RouteError::NotAuthorized));
    }

    #[test]
    fn relay_only_between_mutual_peers() {
        let mut r = registry();
        let (ra, _, _) = r.connect(1, A);
        let (rb, _, _) = r.connect(2, B);
        let (rc, _, _) = r.connect(3, C);
        r.register(1, [B], vec![]);
        r.register(2, [A, C], vec![]);
        r.register(3, [A, B], vec![]);
        assert_eq!(r.route(1, rb, 100, true), Ok((2, ra)));
        assert_eq!(r.route(2, ra, 50, false), Ok((1, rb)));
        // C lists A, A does not list C.
        assert_eq!(r.route(3, ra, 10, true), Err(RouteError::NotAuthorized));
        assert_eq!(r.route(1, rc, 10, true), Err(RouteError::NotAuthorized));
        // B and C list each other.
        assert_eq!(r.route(3, rb, 10, true), Ok((2, rc)));
        assert_eq!(
            r.route(1, 999, 10, true),
            Err(RouteError::UnknownDestination)
        );
        assert_eq!(r.route(9, rb, 10, true), Err(RouteError::UnknownSender));
        // To itself.
        assert_eq!(r.route(1, ra, 10, true), Err(RouteError::NotAuthorized));
        assert_eq!(
            r.counters(&A),
            RelayCounters {
                packets: 1,
                bytes: 100,
                dropped: 3
            }
        );
        assert_eq!(
            r.counters(&C),
            RelayCounters {
                packets: 1,
                bytes: 10,
                dropped: 1
            }
        );
    }

    #[test]
    fn reconnect_replaces_the_old_session() {
        let mut r = registry();
        let (ra, _, _) = r.connect(1, A);
        r.connect(2, B);
        r.register(1, [B], vec![]);
        r.register(2, [A], vec![]);
        let (ra2, replaced, ups) = r.connect(5, A);
        assert_eq!(replaced, Some(1));
        assert_ne!(ra, ra2);
        assert_eq!(
            ups,
            vec![Update {
                to: 2,
                peer: A,
                relay_id: ra,
                candidates: vec![],
                online: false,
                relay: None,
            }]
        );
        let ups = r.register(5, [B], vec![addr(1)]);
        assert_eq!(ups.len(), 2);
        assert!(ups.iter().all(|u| u.online));
        // The old connection's late disconnect changes nothing.
        assert!(r.disconnect(1).is_empty());
        assert!(r.is_connected(&A));
        assert_eq!(r.route(2, ra, 1, true), Err(RouteError::UnknownDestination));
    }

    #[test]
    fn relay_ids_skip_zero_and_wrap() {
        let mut r = Registry::new([(A, "a".into()), (B, "b".into())], u32::MAX);
        let (a, _, _) = r.connect(1, A);
        let (b, _, _) = r.connect(2, B);
        assert_eq!((a, b), (u32::MAX, 1));
    }

    #[test]
    fn a_site_listing_itself_is_ignored() {
        let mut r = registry();
        r.connect(1, A);
        assert!(r.register(1, [A], vec![]).is_empty());
    }

    #[test]
    fn relay_ports_go_to_mutual_pairs_only_and_are_freed_when_they_part() {
        let mut r = registry();
        r.connect(1, A);
        r.connect(2, B);
        r.connect(3, C);
        r.register(1, [B], vec![]);
        r.register(2, [A], vec![]);
        r.register(3, [A], vec![]);
        assert_eq!(
            r.request_relay_port(3, &A),
            RelayRequest::NotAuthorized,
            "A does not list C"
        );
        assert_eq!(r.request_relay_port(1, &C), RelayRequest::NotAuthorized);
        assert_eq!(
            r.request_relay_port(9, &A),
            RelayRequest::NotAuthorized,
            "unknown connection"
        );
        let RelayRequest::New(pair) = r.request_relay_port(2, &A) else {
            panic!("a new port for A and B")
        };
        assert_eq!(pair, pair_key(B, A));
        let ups = r.grant_relay_port(pair, 40000, [[7; 32], [8; 32]]);
        let grant = |_to: ConnId, token| RelayGrant { port: 40000, token };
        let told: Vec<_> = ups.iter().map(|u| (u.to, u.relay)).collect();
        assert_eq!(
            told,
            vec![(1, Some(grant(1, [7; 32]))), (2, Some(grant(2, [8; 32])))]
        );
        // Asking again tells the asker again; a second port for the pair
        // (two requests crossing) is handed back.
        let RelayRequest::Existing(again) = r.request_relay_port(1, &B) else {
            panic!("the same port")
        };
        assert_eq!(again[0].relay, Some(grant(1, [7; 32])));
        assert!(
            r.grant_relay_port(pair, 40001, [[1; 32], [2; 32]])
                .is_empty()
        );
        assert_eq!(r.take_freed_ports(), vec![40001]);
        // B drops A: the port is freed and A's next update has none.
        let ups = r.register(2, [C], vec![]);
        assert!(ups.iter().all(|u| u.relay.is_none()), "{ups:?}");
        assert_eq!(r.take_freed_ports(), vec![40000]);
        assert_eq!(r.request_relay_port(1, &B), RelayRequest::NotAuthorized);
        // A new pair's port is freed when one of them disconnects.
        r.register(2, [A], vec![]);
        let RelayRequest::New(pair) = r.request_relay_port(1, &B) else {
            panic!()
        };
        r.grant_relay_port(pair, 40002, [[3; 32], [4; 32]]);
        r.disconnect(1);
        assert_eq!(r.take_freed_ports(), vec![40002]);
        // A port that closed by itself (idle) is forgotten, and both
        // sites are told; a stale release changes nothing.
        r.connect(1, A);
        r.register(1, [B], vec![]);
        let RelayRequest::New(pair) = r.request_relay_port(1, &B) else {
            panic!()
        };
        r.grant_relay_port(pair, 40003, [[5; 32], [6; 32]]);
        assert!(r.release_relay_port(pair, 40002).is_empty());
        let ups = r.release_relay_port(pair, 40003);
        assert_eq!(ups.len(), 2);
        assert!(ups.iter().all(|u| u.online && u.relay.is_none()), "{ups:?}");
        assert!(matches!(r.request_relay_port(1, &B), RelayRequest::New(_)));
        assert!(r.take_freed_ports().is_empty());
    }
}
