//! The TUN character device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::Error;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open, non-blocking TUN device (layer 3, no packet information header).
///
/// The device is made *persistent*: if the daemon dies, the interface and its
/// routes stay, with no carrier, so traffic for peers is dropped rather than
/// leaking out of the default route. The next start attaches to it again
/// ([`Tun::create_or_attach`]); a clean shutdown deletes it
/// ([`crate::Netlink::delete_link`]).
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
}

impl Tun {
    /// Creates the TUN interface `name`, or attaches to the persistent one a
    /// previous run left behind.
    pub fn create_or_attach(name: &str) -> Result<Self, Error> {
        let fail = |source: io::Error, hint: &'static str| Error::Tun {
            name: name.to_owned(),
            source,
            hint,
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(fail(
                io::ErrorKind::InvalidInput.into(),
                " (names are 1 to 15 bytes)",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| {
                fail(
                    e,
                    " (is /dev/net/tun present, and do we have CAP_NET_ADMIN?)",
                )
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq`
        // mirrors in size and layout; the fd is open.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::EBUSY) => " (another process holds it: is another causeway running?)",
                Some(libc::EPERM) => " (needs CAP_NET_ADMIN)",
                _ => "",
            };
            return Err(fail(e, hint));
        }
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(fail(io::Error::last_os_error(), ""));
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet into `buf`; `WouldBlock` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for `buf.len()` bytes of writes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one packet.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        // SAFETY: the buffer is valid for `packet.len()` bytes of reads.
        let n = unsafe { libc::write(self.file.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Makes the device non-persistent, so that it disappears when the last
    /// descriptor closes. Used on clean shutdown before deleting the link.
    pub fn set_persistent(&self, persistent: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST,
                persistent as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
