//! The one UDP socket of a site: WireGuard now, STUN and path probes later.
//! Batched receive (recvmmsg + GRO) and segmented send (GSO) via quinn-udp.

use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

/// Largest UDP payload a GSO send may carry in one call.
pub(crate) const MAX_GSO_BYTES: usize = 64_000;

pub(crate) struct UdpPort {
    socket: UdpSocket,
    state: UdpSocketState,
    ipv6: bool,
}

impl UdpPort {
    /// Binds `port` on all addresses: dual-stack IPv6 when the host has
    /// IPv6, IPv4 only otherwise. Non-blocking.
    pub(crate) fn bind(port: u16) -> io::Result<Self> {
        let (socket, ipv6) = match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)) {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(_) => (UdpSocket::bind(("0.0.0.0", port))?, false),
        };
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        // Room for bursts: the kernel caps these at net.core.[rw]mem_max.
        let _ = state.set_recv_buffer_size(UdpSockRef::from(&socket), 4 << 20);
        let _ = state.set_send_buffer_size(UdpSockRef::from(&socket), 4 << 20);
        Ok(Self {
            socket,
            state,
            ipv6,
        })
    }

    pub(crate) fn local_port(&self) -> io::Result<u16> {
        Ok(self.socket.local_addr()?.port())
    }

    /// How many segments one GSO send may carry (1 = no GSO).
    pub(crate) fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends `contents` to `dst`; with `segment_size` the kernel splits it
    /// into datagrams of that size (the last may be shorter). Waits while
    /// the socket buffer is full rather than dropping.
    pub(crate) fn send(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = Transmit {
            destination: self.destination(dst),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        loop {
            match self
                .state
                .try_send(UdpSockRef::from(&self.socket), &transmit)
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    super::wait_fd(self.socket.as_fd(), libc::POLLOUT, None, 100)?;
                }
                Err(e)
                    if segment_size.is_some()
                        && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) =>
                {
                    // No GSO on this path after all (quinn-udp has now
                    // turned it off): send the datagrams one by one.
                    for datagram in contents.chunks(segment_size.unwrap_or(contents.len()).max(1)) {
                        self.send(dst, datagram, None)?;
                    }
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    /// Where a datagram to `dst` goes on this socket: an IPv4 destination
    /// is v4-mapped on a dual-stack socket.
    fn destination(&self, dst: SocketAddr) -> SocketAddr {
        match dst {
            SocketAddr::V4(v4) if self.ipv6 => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            other => other,
        }
    }

    /// Sends one datagram with IP TTL (IPv6 hop limit) `ttl`, as ancillary
    /// data: the socket's own TTL stays as it is for every other sender.
    pub(crate) fn send_with_ttl(
        &self,
        dst: SocketAddr,
        contents: &[u8],
        ttl: u8,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: plain C structs, all-zero is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // An IPv4 destination (plain or v4-mapped) takes IP_TTL, an IPv6
        // one IPV6_HOPLIMIT.
        let (len, level, kind) = match self.destination(dst) {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in.
                unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
                let len = std::mem::size_of::<libc::sockaddr_in>();
                (len, libc::IPPROTO_IP, libc::IP_TTL)
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in6.
                unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
                let len = std::mem::size_of::<libc::sockaddr_in6>();
                match v6.ip().to_ipv4_mapped() {
                    Some(_) => (len, libc::IPPROTO_IP, libc::IP_TTL),
                    None => (len, libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT),
                }
            }
        };
        let value = libc::c_int::from(ttl);
        // Room for one cmsghdr with a c_int, aligned.
        let mut control = [0u64; 4];
        let mut iov = libc::iovec {
            iov_base: contents.as_ptr().cast_mut().cast(),
            iov_len: contents.len(),
        };
        // SAFETY: all-zero msghdr is valid; the pointers set below outlive
        // the sendmsg call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = std::ptr::from_mut(&mut storage).cast();
        msg.msg_namelen = len as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen =
            unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
        // SAFETY: msg_control points to `control`, which has room for
        // CMSG_SPACE(c_int) bytes; CMSG_FIRSTHDR is non-null for it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = level;
            (*cmsg).cmsg_type = kind;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), value);
        }
        loop {
            // SAFETY: msg is fully initialised above.
            let n = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &msg, 0) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    super::wait_fd(self.socket.as_fd(), libc::POLLOUT, None, 100)?;
                }
                _ => return Err(e),
            }
        }
    }

    /// Receives a batch; returns how many of `bufs` were filled. Each may
    /// hold several datagrams of `meta.stride` bytes (GRO).
    pub(crate) fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.state.recv(UdpSockRef::from(&self.socket), bufs, meta)
    }
}

impl AsFd for UdpPort {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// IPv4 peers show up as v4-mapped IPv6 on a dual-stack socket; we keep
/// and show them as plain IPv4.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Receives one datagram on `socket` (IP_RECVTTL set) and returns its
    /// payload length and IP TTL.
    fn recv_with_ttl(socket: &UdpSocket) -> (usize, i32) {
        let mut buf = [0u8; 256];
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: all-zero msghdr is valid; the buffers outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg is initialised above.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
        assert!(n >= 0, "{}", io::Error::last_os_error());
        // SAFETY: the kernel filled msg_control with well-formed cmsgs.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert!(!cmsg.is_null(), "no TTL ancillary data");
            assert_eq!(
                ((*cmsg).cmsg_level, (*cmsg).cmsg_type),
                (libc::IPPROTO_IP, libc::IP_TTL)
            );
            (
                n as usize,
                std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>()),
            )
        }
    }

    #[test]
    fn send_with_ttl_sets_the_ttl_of_that_datagram_only() {
        let port = UdpPort::bind(0).expect("bind");
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind");
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let on: libc::c_int = 1;
        // SAFETY: a valid c_int option on a valid socket.
        let rc = unsafe {
            libc::setsockopt(
                receiver.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVTTL,
                std::ptr::from_ref(&on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let dst = receiver.local_addr().expect("addr");
        port.send_with_ttl(dst, b"opening", 2).expect("send");
        port.send(dst, b"normal", None).expect("send");
        assert_eq!(recv_with_ttl(&receiver), (7, 2));
        let (n, ttl) = recv_with_ttl(&receiver);
        assert_eq!(n, 6);
        assert!(ttl > 2, "the socket's TTL is untouched: {ttl}");
    }
}
