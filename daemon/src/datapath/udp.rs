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
        let destination = match dst {
            SocketAddr::V4(v4) if self.ipv6 => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            other => other,
        };
        let transmit = Transmit {
            destination,
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
