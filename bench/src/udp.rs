//! Batched UDP I/O (`sendmmsg`, `recvmmsg`), so that the measuring tool
//! spends as little CPU per datagram as it can: on a 2-core lab machine it
//! shares the CPUs with the tunnel it measures.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd as _;

/// Most datagrams per system call.
pub(crate) const BATCH: usize = 64;

/// Sends each buffer as one datagram on a connected socket; returns how
/// many went out (at least one unless it fails).
pub(crate) fn send_batch(socket: &UdpSocket, bufs: &[&[u8]]) -> io::Result<usize> {
    let n = bufs.len().min(BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut iovecs: [libc::iovec; BATCH] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    // SAFETY: mmsghdr is plain data; all zeroes is a valid (empty) value.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovecs[i] = libc::iovec {
            iov_base: bufs[i].as_ptr() as *mut libc::c_void,
            iov_len: bufs[i].len(),
        };
        msgs[i].msg_hdr.msg_iov = &raw mut iovecs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: n valid mmsghdrs pointing at live iovecs over live buffers
    // (the kernel only reads them).
    let sent =
        unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Asks for a receive buffer of `bytes` (beyond `net.core.rmem_max` when
/// running as root), so that the measuring end is not where datagrams are
/// lost. Best effort: returns the size the kernel granted.
pub(crate) fn grow_receive_buffer(socket: &UdpSocket, bytes: usize) -> usize {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a valid int option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
    }
    let mut granted: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a valid int.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw mut granted).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        usize::try_from(granted).unwrap_or(0)
    } else {
        0
    }
}

/// Receive buffers for [`recv_batch`], allocated once.
pub(crate) struct RecvBufs {
    data: Vec<u8>,
    slot: usize,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
}

impl RecvBufs {
    /// `BATCH` buffers of `slot` bytes each.
    pub(crate) fn new(slot: usize) -> RecvBufs {
        RecvBufs {
            data: vec![0; slot * BATCH],
            slot,
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain data; all zeroes is valid.
            addrs: unsafe { std::mem::zeroed() },
        }
    }

    /// Datagram `i` of the last batch.
    pub(crate) fn get(&self, i: usize) -> &[u8] {
        &self.data[i * self.slot..i * self.slot + self.lens[i].min(self.slot)]
    }

    /// Sender of datagram `i` of the last batch.
    pub(crate) fn addr(&self, i: usize) -> Option<SocketAddr> {
        from_storage(&self.addrs[i])
    }
}

/// Receives up to [`BATCH`] datagrams: blocks (up to the socket's read
/// timeout) for the first, then takes what is queued.
pub(crate) fn recv_batch(socket: &UdpSocket, bufs: &mut RecvBufs) -> io::Result<usize> {
    let mut iovecs: [libc::iovec; BATCH] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; BATCH];
    // SAFETY: mmsghdr is plain data; all zeroes is a valid (empty) value.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let slot = bufs.slot;
    let base = bufs.data.as_mut_ptr();
    for i in 0..BATCH {
        // SAFETY: i * slot is within `data` (BATCH * slot bytes).
        iovecs[i] = libc::iovec {
            iov_base: unsafe { base.add(i * slot) }.cast(),
            iov_len: slot,
        };
        msgs[i].msg_hdr.msg_iov = &raw mut iovecs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = (&raw mut bufs.addrs[i]).cast();
        msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    }
    // SAFETY: BATCH valid mmsghdrs over buffers and address slots that live
    // until the call returns.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for (len, msg) in bufs.lens.iter_mut().zip(&msgs).take(n) {
        *len = msg.msg_len as usize;
    }
    Ok(n)
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET).
            let sin = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (family AF_INET6).
            let sin6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn batches_cross_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        tx.connect(rx.local_addr().expect("addr")).expect("connect");
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        assert_eq!(send_batch(&tx, &refs).expect("send"), 5);
        assert!(grow_receive_buffer(&rx, 1 << 20) > 0);
        let mut bufs = RecvBufs::new(2048);
        let mut got = Vec::new();
        while got.len() < 5 {
            let n = recv_batch(&rx, &mut bufs).expect("recv");
            for i in 0..n {
                assert_eq!(bufs.addr(i), tx.local_addr().ok());
                got.push(bufs.get(i).to_vec());
            }
        }
        assert_eq!(got, payloads);
    }
}
