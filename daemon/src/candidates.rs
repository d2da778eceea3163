//! This site's own candidate addresses for NAT traversal: the host
//! addresses of the gateway's interfaces, with the WireGuard port.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Most host candidates offered (the rest are rarely useful and cost probes).
const MAX_HOST_CANDIDATES: usize = 8;

/// The addresses of this host's interfaces that a peer could reach, each
/// with `port`: up interfaces except loopback and `exclude` (our TUN), and
/// no link-local or unspecified addresses.
pub fn host_candidates(port: u16, exclude: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::warn!("getifaddrs: {}", std::io::Error::last_os_error());
        return out;
    }
    let mut cursor = head;
    while !cursor.is_null() && out.len() < MAX_HOST_CANDIDATES {
        // SAFETY: `cursor` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cursor };
        cursor = ifa.ifa_next;
        let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        let loopback = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
        if !up || loopback || ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated interface name owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if name == exclude {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr of the family it names.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        let useless = match ip {
            IpAddr::V4(a) => a.is_unspecified() || a.is_link_local() || a.is_loopback(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_unicast_link_local() || a.is_loopback(),
        };
        if !useless && !out.iter().any(|c: &SocketAddr| c.ip() == ip) {
            out.push(SocketAddr::new(ip, port));
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_candidates_skip_loopback_and_carry_the_port() {
        let candidates = host_candidates(51820, "causeway-none");
        assert!(candidates.len() <= MAX_HOST_CANDIDATES);
        for c in candidates {
            assert_eq!(c.port(), 51820);
            assert!(!c.ip().is_loopback(), "{c}");
        }
    }
}
