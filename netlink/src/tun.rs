//! The TUN character device, with segmentation offloads.
//!
//! The device is opened with `IFF_VNET_HDR` and TCP (and, where the kernel
//! has it, UDP) segmentation offload, the way Tailscale's wireguard-go
//! does: the kernel hands us TCP "super-packets" of up to 64 KiB that we
//! split into MTU-size segments ([`Tun::recv_segments`]), and we hand it
//! back runs of consecutive TCP segments coalesced into one packet
//! ([`Tun::send_batch`]). One system call then carries tens of packets each
//! way, and the local TCP stacks see few large packets instead of many
//! small ones. The splitting and coalescing are tun-rs's (a port of
//! wireguard-go's `tun/offload_linux.go`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use tun_rs::{DeviceBuilder, SyncDevice};

use crate::Error;

pub use tun_rs::GROTable as GroTable;

/// Bytes every buffer handed to [`Tun::send_batch`] must keep free before
/// the packet (for the virtio-net header the kernel expects).
pub const TUN_HEADROOM: usize = tun_rs::VIRTIO_NET_HDR_LEN;

/// Segments one super-packet from the kernel can split into at most
/// (64 KiB at the smallest MSS we expect); [`Tun::recv_segments`] needs
/// this many output buffers.
pub const MAX_SEGMENTS: usize = tun_rs::IDEAL_BATCH_SIZE;

/// Size of the scratch buffer [`Tun::recv_segments`] reads into.
pub const RECV_SCRATCH: usize = TUN_HEADROOM + 65_535;

const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// An open, non-blocking TUN device (layer 3, offloads on).
///
/// The device is made *persistent*: if the daemon dies, the interface and its
/// routes stay, with no carrier, so traffic for peers is dropped rather than
/// leaking out of the default route. The next start attaches to it again
/// ([`Tun::create_or_attach`]); a clean shutdown deletes it
/// ([`crate::Netlink::delete_link`]).
pub struct Tun {
    dev: SyncDevice,
    name: String,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun").field("name", &self.name).finish()
    }
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
        let dev = DeviceBuilder::new()
            .name(name)
            .offload(true)
            .build_sync()
            .map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::EBUSY) => {
                        " (another process holds it: is another causeway running?)"
                    }
                    Some(libc::EPERM) => " (needs CAP_NET_ADMIN)",
                    Some(libc::ENOENT | libc::ENODEV) => " (is /dev/net/tun present?)",
                    Some(libc::EINVAL) => " (is an interface of another kind using the name?)",
                    _ => "",
                };
                fail(e, hint)
            })?;
        if !dev.tcp_gso() {
            return Err(fail(
                io::ErrorKind::Unsupported.into(),
                " (the kernel refused TUN offloads)",
            ));
        }
        dev.set_nonblocking(true).map_err(|e| fail(e, ""))?;
        let tun = Self {
            dev,
            name: name.to_owned(),
        };
        tun.set_persistent(true).map_err(|e| fail(e, ""))?;
        Ok(tun)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet from the kernel and splits it into segments that
    /// each fit the MTU: `bufs[i][..sizes[i]]` for `i` below the returned
    /// count. `scratch` must hold [`RECV_SCRATCH`] bytes, `bufs` at least
    /// [`MAX_SEGMENTS`] buffers (fewer may not hold a whole super-packet).
    /// `WouldBlock` when nothing is waiting; `InvalidData` when the kernel
    /// handed over something that cannot be split (the packet is gone).
    pub fn recv_segments<B: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        scratch: &mut [u8],
        bufs: &mut [B],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        self.dev
            .recv_multiple(scratch, bufs, sizes, 0)
            .map_err(|e| match e.raw_os_error() {
                Some(_) => e,
                None => io::Error::new(io::ErrorKind::InvalidData, e),
            })
    }

    /// Writes `bufs` (each a packet after [`TUN_HEADROOM`] bytes of
    /// headroom), coalescing consecutive TCP (and UDP) segments of one flow
    /// into one packet. `gro` is reused across calls. The buffers are
    /// scratch afterwards: coalescing appends to some of them.
    pub fn send_batch(&self, gro: &mut GroTable, bufs: &mut [Vec<u8>]) -> io::Result<usize> {
        self.dev.send_multiple(gro, bufs, TUN_HEADROOM)
    }

    /// Writes one packet.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        let header = [0u8; TUN_HEADROOM];
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut _,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: packet.as_ptr() as *mut _,
                iov_len: packet.len(),
            },
        ];
        // SAFETY: both iovecs point to live buffers of the given lengths,
        // which writev only reads.
        let n = unsafe { libc::writev(self.dev.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok((n as usize).saturating_sub(TUN_HEADROOM))
        }
    }

    /// Makes the device persistent or not; a non-persistent one disappears
    /// when the last descriptor closes. Used on clean shutdown before
    /// deleting the link.
    pub fn set_persistent(&self, persistent: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe {
            libc::ioctl(
                self.dev.as_raw_fd(),
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
        self.dev.as_fd()
    }
}
