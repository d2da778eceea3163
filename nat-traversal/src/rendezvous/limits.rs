//! What the rendezvous allows each client, without I/O: connections
//! waiting to authenticate (in all and per source), registrations
//! per site (a token bucket that coalesces the excess), and the peer
//! updates queued for one site (one per peer, the latest).
//!
//! The server's driver holds these and passes `now`; docs/rendezvous.md
//! ("Threat model") says why each limit is what it is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::registry::{SiteKey, Update};

/// Most connections authenticating at once, from all sources.
pub(crate) const MAX_PENDING_AUTH: usize = 256;
/// Most connections authenticating at once from one source (see [`source`]).
pub(crate) const MAX_PENDING_PER_IP: usize = 8;
/// Above this many connections authenticating at once, a new connection
/// from an address not yet validated is sent a QUIC Retry first.
pub(crate) const RETRY_ABOVE: usize = 32;

/// Candidates of a registration that are kept (the rest are dropped): as
/// many as a site's path selection keeps of a peer's.
pub(crate) const MAX_CANDIDATES: usize = crate::path::MAX_REMOTE_CANDIDATES;

/// Registrations a site may send at once before it is slowed down.
pub(crate) const REGISTER_BURST: u32 = 8;
/// One more registration is allowed per this interval.
pub(crate) const REGISTER_INTERVAL: Duration = Duration::from_millis(250);

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Take it; a slot is held until [`PendingTable::release`].
    Accept,
    /// Ask the client to prove its address first (QUIC Retry); no slot held.
    Validate,
    /// Refuse it; no slot held.
    Refuse,
}

/// The source a connection counts against: its IPv4 address, or the /64
/// of its IPv6 address (one host, or one subnet's worth of them, usually
/// holds a whole /64).
pub(crate) fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Connections waiting to authenticate, in all and per source (see
/// [`source`]).
#[derive(Debug, Default)]
pub(crate) struct PendingTable {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl PendingTable {
    /// Decides about a connection attempt from `ip`; `validated`: its
    /// address is proven (it answered a Retry). Takes a slot on `Accept`.
    ///
    /// An address not yet validated is asked to validate when its source
    /// already has a connection authenticating or when many are, so that a
    /// spoofed source cannot use up another address' share.
    pub(crate) fn admit(&mut self, ip: IpAddr, validated: bool) -> Admission {
        let ip = source(ip);
        let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
        if self.total >= MAX_PENDING_AUTH || from_ip >= MAX_PENDING_PER_IP {
            return Admission::Refuse;
        }
        if !validated && (from_ip > 0 || self.total >= RETRY_ABOVE) {
            return Admission::Validate;
        }
        self.total += 1;
        *self.per_ip.entry(ip).or_default() += 1;
        Admission::Accept
    }

    /// Gives back the slot an accepted connection from `ip` held.
    pub(crate) fn release(&mut self, ip: IpAddr) {
        let ip = source(ip);
        if let Some(n) = self.per_ip.get_mut(&ip) {
            self.total = self.total.saturating_sub(1);
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// Connections authenticating now.
    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.total
    }
}

/// A token bucket that coalesces what exceeds it: an item offered without
/// a token waits, replaced by any later one, until the next token.
#[derive(Debug)]
pub(crate) struct Coalescer<T> {
    tokens: u32,
    /// When the next token arrives (meaningful while `tokens < burst`).
    refill_at: Instant,
    burst: u32,
    interval: Duration,
    waiting: Option<T>,
}

impl<T> Coalescer<T> {
    /// A full bucket of `burst` tokens, one more per `interval`.
    pub(crate) fn new(now: Instant, burst: u32, interval: Duration) -> Self {
        Self {
            tokens: burst,
            refill_at: now + interval,
            burst,
            interval,
            waiting: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        while self.tokens < self.burst && now >= self.refill_at {
            self.tokens += 1;
            self.refill_at += self.interval;
        }
        if self.tokens >= self.burst {
            self.refill_at = now + self.interval;
        }
    }

    /// `item` arrived: returned if it may be applied now, else kept; either
    /// way it supersedes any item already waiting (which is dropped).
    pub(crate) fn offer(&mut self, now: Instant, item: T) -> Option<T> {
        self.refill(now);
        if self.tokens > 0 {
            // A waiting item whose token has come is superseded by this one.
            self.tokens -= 1;
            self.waiting = None;
            return Some(item);
        }
        self.waiting = Some(item);
        None
    }

    /// Whether an item waits (an offer now would replace it).
    pub(crate) fn waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// When the waiting item may be applied, if one waits.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        self.waiting.as_ref().map(|_| self.refill_at)
    }

    /// The waiting item, if its token has come.
    pub(crate) fn poll(&mut self, now: Instant) -> Option<T> {
        self.waiting.as_ref()?;
        self.refill(now);
        if self.tokens == 0 {
            return None;
        }
        self.tokens -= 1;
        self.waiting.take()
    }
}

/// The peer updates waiting to be written to one site: at most one per
/// peer (a newer update about a peer replaces the queued one and goes to
/// the back), so the queue is never longer than the number of sites.
///
/// Every operation is O(1) amortized, whatever the number of peers: a
/// replaced update is only marked stale (its peer's latest sequence
/// number moved on) and skipped when it reaches the front, and the stale
/// entries are swept once they outnumber the live ones, so they never
/// take more than about twice the room of the live ones.
#[derive(Debug, Default)]
pub(crate) struct UpdateQueue {
    /// Updates in order, with their sequence numbers; some are stale.
    items: VecDeque<(u64, Update)>,
    /// The sequence number of the live (latest) update about each peer.
    latest: HashMap<SiteKey, u64>,
    next: u64,
}

impl UpdateQueue {
    /// Queues `update`, dropping an older one about the same peer; the
    /// number of updates so dropped (0 or 1).
    pub(crate) fn push(&mut self, update: Update) -> usize {
        let seq = self.next;
        self.next += 1;
        let dropped = usize::from(self.latest.insert(update.peer, seq).is_some());
        self.items.push_back((seq, update));
        if self.items.len() > 2 * self.latest.len() + 16 {
            let latest = &self.latest;
            self.items
                .retain(|(seq, u)| latest.get(&u.peer) == Some(seq));
        }
        dropped
    }

    /// The oldest update.
    pub(crate) fn pop(&mut self) -> Option<Update> {
        while let Some((seq, update)) = self.items.pop_front() {
            if self.latest.get(&update.peer) == Some(&seq) {
                self.latest.remove(&update.peer);
                if self.latest.is_empty() {
                    // Whatever is left is stale. An idle site's queue holds
                    // no memory (a rendezvous has one per site), and a burst
                    // (a site with thousands of peers coming online) leaves
                    // no large buffers behind.
                    self.items = VecDeque::new();
                    self.latest = HashMap::new();
                }
                return Some(update);
            }
        }
        None
    }

    /// Updates queued (live ones: one per peer at most).
    pub(crate) fn len(&self) -> usize {
        self.latest.len()
    }

    /// Whether an update about `peer` is queued.
    #[cfg(test)]
    pub(crate) fn has(&self, peer: &SiteKey) -> bool {
        self.latest.contains_key(peer)
    }

    /// Entries held, stale ones included.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.items.len()
    }
}

/// The peers of a registration that can matter: configured sites, each
/// once. Others (a site's peers served by another rendezvous, duplicates)
/// are dropped; the count of dropped keys is returned.
pub(crate) fn configured_peers(
    peers: impl IntoIterator<Item = SiteKey>,
    is_configured: impl Fn(&SiteKey) -> bool,
) -> (Vec<SiteKey>, usize) {
    // A set, not `kept.contains`: a registration may list thousands of
    // peers, and a linear check per key made it quadratic (5,000 peers:
    // 12.5 million key comparisons under the server's lock).
    let mut seen: HashSet<SiteKey> = HashSet::new();
    let mut kept: Vec<SiteKey> = Vec::new();
    let mut dropped = 0;
    for key in peers {
        if is_configured(&key) && seen.insert(key) {
            kept.push(key);
        } else {
            dropped += 1;
        }
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn one_source_cannot_take_every_slot() {
        let mut t = PendingTable::default();
        assert_eq!(t.admit(ip(1), false), Admission::Accept);
        // The source has one authenticating: it must validate its address.
        assert_eq!(t.admit(ip(1), false), Admission::Validate);
        for _ in 1..MAX_PENDING_PER_IP {
            assert_eq!(t.admit(ip(1), true), Admission::Accept);
        }
        assert_eq!(t.admit(ip(1), true), Admission::Refuse);
        assert_eq!(t.total(), MAX_PENDING_PER_IP);
        // Another source still gets in, without a Retry.
        assert_eq!(t.admit(ip(2), false), Admission::Accept);
        t.release(ip(1));
        assert_eq!(t.admit(ip(1), true), Admission::Accept);
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let mut t = PendingTable::default();
        for i in 0..MAX_PENDING_PER_IP as u16 {
            let ip = IpAddr::from([0x2001, 0xdb8, 0, 1, i, i, i, i]);
            assert_eq!(t.admit(ip, true), Admission::Accept);
        }
        let same_64 = IpAddr::from([0x2001, 0xdb8, 0, 1, 0xffff, 0, 0, 9]);
        assert_eq!(t.admit(same_64, true), Admission::Refuse);
        let other_64 = IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]);
        assert_eq!(t.admit(other_64, true), Admission::Accept);
        // IPv4-mapped addresses count as the IPv4 address.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(source(mapped), ip(1));
        t.release(IpAddr::from([0x2001, 0xdb8, 0, 1, 7, 7, 7, 7]));
        assert_eq!(t.admit(same_64, true), Admission::Accept);
    }

    #[test]
    fn many_sources_fill_the_global_pool_then_are_refused() {
        let mut t = PendingTable::default();
        let mut n = 0usize;
        'fill: for a in 0..=255u8 {
            for b in 0..=255u8 {
                if n == MAX_PENDING_AUTH {
                    break 'fill;
                }
                let ip = IpAddr::from([10, 0, a, b]);
                if n >= RETRY_ABOVE {
                    // Many authenticating: addresses must be proven first.
                    assert_eq!(t.admit(ip, false), Admission::Validate, "attempt {n}");
                    assert_eq!(t.admit(ip, true), Admission::Accept);
                } else {
                    assert_eq!(t.admit(ip, false), Admission::Accept, "attempt {n}");
                }
                n += 1;
            }
        }
        assert_eq!(t.total(), MAX_PENDING_AUTH);
        assert_eq!(t.admit(ip(9), true), Admission::Refuse);
        t.release(IpAddr::from([10, 0, 0, 0]));
        assert_eq!(t.admit(ip(9), true), Admission::Accept);
        // Releasing what was never taken changes nothing.
        t.release(ip(77));
        assert_eq!(t.total(), MAX_PENDING_AUTH);
    }

    #[test]
    fn registrations_beyond_the_burst_are_coalesced_not_lost() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(t0, 3, Duration::from_millis(100));
        for i in 0..3 {
            assert_eq!(c.offer(t0, i), Some(i));
        }
        assert_eq!(c.wake_at(), None);
        // A flood: only the latest is kept.
        for i in 3..1000 {
            assert_eq!(c.offer(t0, i), None);
        }
        let wake = c.wake_at().unwrap();
        assert_eq!(wake, t0 + Duration::from_millis(100));
        assert_eq!(c.poll(t0 + Duration::from_millis(99)), None);
        assert_eq!(c.poll(wake), Some(999));
        assert_eq!(c.wake_at(), None);
        assert_eq!(c.poll(wake), None);
        // Nothing jumps the queue: with one waiting, a new one waits too.
        assert_eq!(c.offer(wake, 1000), None);
        assert_eq!(c.offer(wake, 1001), None);
        assert_eq!(c.poll(wake + Duration::from_millis(100)), Some(1001));
        // A token that came while one waits goes to the newest at once.
        assert_eq!(c.offer(wake + Duration::from_millis(150), 1002), None);
        assert_eq!(c.offer(wake + Duration::from_millis(200), 1003), Some(1003));
        assert_eq!(c.wake_at(), None);
        assert_eq!(c.poll(wake + Duration::from_secs(1)), None);
        // Idle refills the bucket, to the burst and no more.
        let later = wake + Duration::from_secs(10);
        for i in 0..3 {
            assert_eq!(c.offer(later, i), Some(i));
        }
        assert_eq!(c.offer(later, 3), None);
    }

    #[test]
    fn a_flood_gets_one_registration_per_interval() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(t0, REGISTER_BURST, REGISTER_INTERVAL);
        let mut applied = 0;
        let mut now = t0;
        // 10 s of a registration every millisecond.
        for i in 0..10_000u32 {
            now = t0 + Duration::from_millis(u64::from(i));
            applied += usize::from(c.poll(now).is_some());
            applied += usize::from(c.offer(now, i).is_some());
        }
        applied += usize::from(c.poll(now + REGISTER_INTERVAL).is_some());
        let most = REGISTER_BURST as usize + 10_000 / REGISTER_INTERVAL.as_millis() as usize + 1;
        assert!(applied <= most, "{applied} > {most}");
        assert!(applied >= most - 2, "{applied}");
    }

    fn update(peer: u8, port: u16) -> Update {
        Update {
            to: 1,
            peer: [peer; 32],
            relay_id: 7,
            candidates: vec![std::net::SocketAddr::from(([192, 0, 2, 1], port))],
            online: true,
            relay: None,
        }
    }

    #[test]
    fn updates_about_one_peer_are_coalesced_to_the_latest() {
        let mut q = UpdateQueue::default();
        assert_eq!(q.push(update(1, 1)), 0);
        assert_eq!(q.push(update(2, 1)), 0);
        for port in 2..10_000 {
            q.push(update(1, port));
        }
        assert_eq!(q.len(), 2);
        assert!(q.has(&[1; 32]) && q.has(&[2; 32]));
        assert_eq!(q.pop(), Some(update(2, 1)));
        assert_eq!(q.pop(), Some(update(1, 9_999)));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_queue_of_many_peers_stays_linear_and_bounded() {
        // A hub with 5,000 peers hears about all of them, then every one
        // of them again: each push is O(1), and the stale entries are
        // swept, so the queue holds about twice the live ones at most.
        let mut q = UpdateQueue::default();
        let peer = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            k
        };
        let up = |i: u32, port: u16| Update {
            to: 1,
            peer: peer(i),
            relay_id: 7,
            candidates: vec![std::net::SocketAddr::from(([192, 0, 2, 1], port))],
            online: true,
            relay: None,
        };
        let mut dropped = 0;
        for round in 0..3u16 {
            for i in 0..5_000 {
                dropped += q.push(up(i, round));
                assert!(q.held() <= 2 * q.len() + 17, "{} held", q.held());
            }
        }
        assert_eq!((q.len(), dropped), (5_000, 10_000));
        // The latest of each, in the order of their last push.
        for i in 0..5_000 {
            assert_eq!(q.pop(), Some(up(i, 2)));
        }
        assert_eq!(q.pop(), None);
        assert_eq!((q.len(), q.held()), (0, 0));
    }

    #[test]
    fn a_peer_replaced_while_others_wait_keeps_its_new_place() {
        let mut q = UpdateQueue::default();
        q.push(update(1, 1));
        q.push(update(2, 1));
        q.push(update(1, 2));
        q.push(update(3, 1));
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop(), Some(update(2, 1)));
        assert_eq!(q.pop(), Some(update(1, 2)));
        // Queued again after it was written: a new entry, not a stale one.
        q.push(update(1, 3));
        assert_eq!(q.pop(), Some(update(3, 1)));
        assert_eq!(q.pop(), Some(update(1, 3)));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn thousands_of_peers_with_duplicates_are_deduplicated_in_order() {
        let key = |i: u32| {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            k
        };
        // 5,000 configured peers, each listed twice, and 100 unknown ones.
        let listed = (0..5_000)
            .chain(0..5_000)
            .chain(0x0100_0000..0x0100_0064)
            .map(key);
        let (kept, dropped) = configured_peers(listed, |k| k[0] == 0);
        assert_eq!(kept, (0..5_000).map(key).collect::<Vec<_>>());
        assert_eq!(dropped, 5_100);
    }

    #[test]
    fn only_configured_peers_count_once_each() {
        let configured = |k: &SiteKey| k[0] < 3;
        let (kept, dropped) =
            configured_peers([[1; 32], [9; 32], [1; 32], [2; 32], [3; 32]], configured);
        assert_eq!(kept, vec![[1; 32], [2; 32]]);
        assert_eq!(dropped, 3);
    }
}
