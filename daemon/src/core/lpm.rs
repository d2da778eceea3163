//! Longest-prefix match for the data path's route lookup.
//!
//! For each prefix length present, longest first, the masked networks are
//! kept sorted for a binary search. A lookup costs one binary search per
//! distinct prefix length (one to three in real configs), so per-packet
//! work grows with the logarithm of the number of routes, not with it.

use std::net::IpAddr;

use ipnet::IpNet;

/// A route table from CIDRs to values of type `T`.
#[derive(Debug, Clone)]
pub(super) struct Lpm<T> {
    v4: Vec<Level<u32, T>>,
    v6: Vec<Level<u128, T>>,
}

/// The networks of one prefix length, sorted by their masked address.
#[derive(Debug, Clone)]
struct Level<K, T> {
    len: u8,
    nets: Vec<(K, T)>,
}

impl<T: Copy> Lpm<T> {
    /// Builds the table. Where two entries have the same network, the
    /// first one wins.
    pub(super) fn new(entries: impl IntoIterator<Item = (IpNet, T)>) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, value) in entries {
            match net {
                IpNet::V4(n) => insert(&mut v4, n.prefix_len(), u32::from(n.network()), value),
                IpNet::V6(n) => insert(&mut v6, n.prefix_len(), u128::from(n.network()), value),
            }
        }
        Lpm {
            v4: finish(v4),
            v6: finish(v6),
        }
    }

    /// The value of the longest prefix that contains `addr`.
    pub(super) fn get(&self, addr: IpAddr) -> Option<T> {
        match addr {
            IpAddr::V4(a) => lookup(&self.v4, u32::from(a)),
            IpAddr::V6(a) => lookup(&self.v6, u128::from(a)),
        }
    }
}

/// An unsigned address of 32 or 128 bits.
trait Bits: Copy + Ord {
    /// The address with every bit after the first `len` cleared.
    fn masked(self, len: u8) -> Self;
}

impl Bits for u32 {
    fn masked(self, len: u8) -> Self {
        match len {
            0 => 0,
            len => self & (u32::MAX << (Self::BITS - u32::from(len))),
        }
    }
}

impl Bits for u128 {
    fn masked(self, len: u8) -> Self {
        match len {
            0 => 0,
            len => self & (u128::MAX << (Self::BITS - u32::from(len))),
        }
    }
}

fn insert<K: Bits, T>(levels: &mut Vec<Level<K, T>>, len: u8, network: K, value: T) {
    let level = match levels.iter().position(|l| l.len == len) {
        Some(i) => &mut levels[i],
        None => {
            levels.push(Level {
                len,
                nets: Vec::new(),
            });
            levels.last_mut().expect("just pushed")
        }
    };
    level.nets.push((network, value));
}

/// Longest prefix first; each level sorted, the first of equal networks kept.
fn finish<K: Bits, T>(mut levels: Vec<Level<K, T>>) -> Vec<Level<K, T>> {
    levels.sort_by_key(|l| std::cmp::Reverse(l.len));
    for level in &mut levels {
        // Stable: among equal networks the first inserted stays first.
        level.nets.sort_by_key(|&(k, _)| k);
        level.nets.dedup_by_key(|&mut (k, _)| k);
    }
    levels
}

fn lookup<K: Bits, T: Copy>(levels: &[Level<K, T>], addr: K) -> Option<T> {
    levels.iter().find_map(|level| {
        let key = addr.masked(level.len);
        level
            .nets
            .binary_search_by_key(&key, |&(k, _)| k)
            .ok()
            .map(|i| level.nets[i].1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(nets: &[&str]) -> Lpm<usize> {
        Lpm::new(
            nets.iter()
                .enumerate()
                .map(|(i, n)| (n.parse().unwrap(), i)),
        )
    }

    fn get(t: &Lpm<usize>, addr: &str) -> Option<usize> {
        t.get(addr.parse().unwrap())
    }

    #[test]
    fn the_longest_prefix_wins_whatever_the_order() {
        let t = table(&["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "0.0.0.0/0"]);
        assert_eq!(get(&t, "10.1.2.3"), Some(2));
        assert_eq!(get(&t, "10.1.3.3"), Some(1));
        assert_eq!(get(&t, "10.2.0.1"), Some(0));
        assert_eq!(get(&t, "192.0.2.1"), Some(3));
        let t = table(&["10.1.2.0/24", "10.0.0.0/8"]);
        assert_eq!(get(&t, "10.1.2.255"), Some(0));
        assert_eq!(get(&t, "11.0.0.0"), None);
    }

    #[test]
    fn host_bits_in_a_cidr_do_not_matter() {
        let t = table(&["10.1.2.3/16"]);
        assert_eq!(get(&t, "10.1.200.1"), Some(0));
        assert_eq!(get(&t, "10.2.0.1"), None);
    }

    #[test]
    fn families_are_apart_and_full_lengths_work() {
        let t = table(&["fd00::/8", "fd00:1::1/128", "192.0.2.7/32", "::/0"]);
        assert_eq!(get(&t, "fd00:1::1"), Some(1));
        assert_eq!(get(&t, "fd00:1::2"), Some(0));
        assert_eq!(get(&t, "2001:db8::1"), Some(3));
        assert_eq!(get(&t, "192.0.2.7"), Some(2));
        assert_eq!(get(&t, "192.0.2.8"), None);
    }

    #[test]
    fn the_first_of_equal_networks_wins() {
        let t = table(&["10.0.0.0/16", "10.0.0.0/16"]);
        assert_eq!(get(&t, "10.0.0.1"), Some(0));
    }

    #[test]
    fn agrees_with_a_scan_on_many_random_tables() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for _ in 0..200 {
            let nets: Vec<IpNet> = (0..rng.gen_range(1..40))
                .map(|_| {
                    // Few distinct high bits, so that prefixes nest.
                    let addr = std::net::Ipv4Addr::from(rng.r#gen::<u32>() & 0xc3c3_c3c3);
                    IpNet::new(addr.into(), rng.gen_range(0..=32)).unwrap()
                })
                .collect();
            let t = Lpm::new(nets.iter().copied().enumerate().map(|(i, n)| (n, i)));
            for _ in 0..200 {
                let addr: IpAddr =
                    std::net::Ipv4Addr::from(rng.r#gen::<u32>() & 0xc3c3_c3c3).into();
                // The scan the table replaced: longest first, config order
                // among equal lengths.
                let mut sorted: Vec<(IpNet, usize)> = nets
                    .iter()
                    .copied()
                    .enumerate()
                    .map(|(i, n)| (n, i))
                    .collect();
                sorted.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
                let scan = sorted
                    .iter()
                    .find(|(n, _)| n.contains(&addr))
                    .map(|&(_, i)| i);
                assert_eq!(t.get(addr), scan, "{addr} in {nets:?}");
            }
        }
    }
}
