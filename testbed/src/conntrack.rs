//! `conntrack -F` without the conntrack tool: one ctnetlink request.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

/// Deletes every connection-tracking entry (IPv4 and IPv6) of the calling
/// thread's network namespace, and with them every NAT mapping.
pub(crate) fn flush() -> io::Result<()> {
    // SAFETY: socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };

    // nlmsghdr (16 bytes) + nfgenmsg (family AF_UNSPEC = all, version 0, res_id 0).
    let mut msg = [0u8; 20];
    msg[0..4].copy_from_slice(&20u32.to_ne_bytes());
    msg[4..6].copy_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    msg[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: sockaddr_nl is plain data; all zeroes is the kernel's address.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid buffer and address.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 512];
    // SAFETY: receiving into a valid buffer.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // The ack is an NLMSG_ERROR whose error code is 0 on success, -errno otherwise.
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
    if n < 20 || kind != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::other("unexpected ctnetlink reply"));
    }
    if code != 0 {
        return Err(io::Error::from_raw_os_error(-code));
    }
    Ok(())
}
