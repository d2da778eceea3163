//! The user-space WAN emulator: a thread that repeats Ethernet frames between
//! two interfaces of a "wire" namespace, late and lossy.
//!
//! Each interface has an `AF_PACKET` socket (`ETH_P_ALL`, bound to it,
//! `PACKET_IGNORE_OUTGOING` so what we send is not read back). The thread
//! `ppoll`s both sockets and an eventfd (stop) with a timeout that ends when
//! the next held frame is due, reads with `recvmmsg` into recycled buffers,
//! drops each frame with probability `loss`, queues the rest (one FIFO per
//! direction: with one fixed delay, arrival order is due order) and writes
//! due frames with `sendmmsg`. Idle, it does not wake up at all.
//!
//! Loss spares link control (ARP, IPv6 neighbour discovery): the emulated
//! WAN is a routed path, where neither crosses, so losing them would only
//! stall address resolution on the emulator's own link, not model a WAN.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use crate::Error;
use crate::netns::Netns;

/// User-space WAN emulation on an access link, applied to each direction
/// independently. The default (zero) means none.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Wan {
    /// One-way delay added to every frame.
    pub delay: Duration,
    /// Probability of dropping a frame, `0.0..=1.0`.
    pub loss: f64,
}

impl Wan {
    /// True when this adds neither delay nor loss.
    pub fn is_none(&self) -> bool {
        self.delay.is_zero() && self.loss == 0.0
    }
}

/// Counters of the WAN emulators, summed over all of a lab's sites.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WanStats {
    /// Frames delivered.
    pub forwarded: u64,
    /// Frames dropped on purpose (`Wan::loss`).
    pub lost: u64,
    /// Frames dropped because the queue was full, a frame was too large, or sending failed.
    pub dropped: u64,
}

/// Largest frame carried: a 1500-byte MTU plus Ethernet and VLAN headers, rounded up.
const SLOT: usize = 2048;
/// Frames per recvmmsg/sendmmsg call.
const BATCH: usize = 64;
/// Most frames held at once per wire (both directions); beyond that frames
/// are tail-dropped like a full router queue. Buffers are allocated lazily.
const MAX_FRAMES: usize = 65_536;
/// How long to wait before retrying when the receiving veth is full.
const RETRY: Duration = Duration::from_micros(50);

type Buf = Box<[u8; SLOT]>;

/// A running emulator; stops and joins on drop, before its namespace goes.
pub(crate) struct Wire {
    thread: Option<JoinHandle<()>>,
    stop: OwnedFd,
    shared: Arc<Shared>,
    ns: Netns,
}

#[derive(Default)]
struct Shared {
    clock: Mutex<Clock>,
    forwarded: AtomicU64,
    lost: AtomicU64,
    dropped: AtomicU64,
}

/// The emulator thread's CPU clock while it runs, its final CPU time after.
#[derive(Default)]
enum Clock {
    #[default]
    NotStarted,
    Running(libc::clockid_t),
    Done(Duration),
}

impl Wire {
    /// Starts repeating frames between `a` and `b` (interfaces of `ns`, up).
    pub(crate) fn start(ns: Netns, a: &str, b: &str, wan: Wan) -> Result<Wire, Error> {
        let sockets = ns
            .try_enter(|| Ok::<_, io::Error>([packet_socket(a)?, packet_socket(b)?]))?
            .map_err(|e| ns.io_error("opening AF_PACKET sockets", e))?;
        // SAFETY: eventfd(2); the fd is owned right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(ns.io_error("eventfd", io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(fd) };
        let thread_stop = stop
            .try_clone()
            .map_err(|e| ns.io_error("dup eventfd", e))?;
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("wire-{}", ns.name()))
            .spawn(move || run(sockets, thread_stop, wan, &thread_shared))
            .map_err(|e| ns.io_error("spawning the wire thread", e))?;
        Ok(Wire {
            thread: Some(thread),
            stop,
            shared,
            ns,
        })
    }

    /// The emulator thread's CPU time so far.
    pub(crate) fn cpu_time(&self) -> Duration {
        match *lock(&self.shared.clock) {
            Clock::NotStarted => Duration::ZERO,
            // The thread cannot exit while we hold the lock, so the clock is valid.
            Clock::Running(clock) => clock_time(clock),
            Clock::Done(time) => time,
        }
    }

    pub(crate) fn stats(&self) -> WanStats {
        WanStats {
            forwarded: self.shared.forwarded.load(Relaxed),
            lost: self.shared.lost.load(Relaxed),
            dropped: self.shared.dropped.load(Relaxed),
        }
    }

    pub(crate) fn netns_mut(&mut self) -> &mut Netns {
        &mut self.ns
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if thread.join().is_err() {
            eprintln!(
                "causeway-testbed: the WAN emulator thread of {} panicked",
                self.ns.name()
            );
        }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn clock_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A non-blocking `AF_PACKET` socket receiving every frame arriving on `ifname`.
fn packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let cvt = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // Protocol 0: receive nothing until bound to the interface.
    // SAFETY: socket(2); the fd is owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |level, name, value: libc::c_int| {
        // SAFETY: setsockopt with an int option.
        cvt(unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as u32,
            )
        })
    };
    set(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
    set(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)?;
    set(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20)?;
    let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: binding to a valid sockaddr_ll.
    cvt(unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    })?;
    Ok(socket)
}

/// The emulator thread.
fn run(sockets: [OwnedFd; 2], stop: OwnedFd, wan: Wan, shared: &Shared) {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: asks for this thread's CPU clock id.
    if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0 {
        *lock(&shared.clock) = Clock::Running(clock);
    }
    // Publish the final CPU time however the loop ends.
    struct Finish<'a>(&'a Shared);
    impl Drop for Finish<'_> {
        fn drop(&mut self) {
            *lock(&self.0.clock) = Clock::Done(clock_time(libc::CLOCK_THREAD_CPUTIME_ID));
        }
    }
    let _finish = Finish(shared);
    // Wake up within a microsecond of a frame's due time.
    // SAFETY: prctl on the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };

    let fds = [sockets[0].as_raw_fd(), sockets[1].as_raw_fd()];
    let mut wire = Emulator::new(wan);
    loop {
        let now = Instant::now();
        // Direction d carries frames read on fds[d] to fds[1 - d].
        wire.send_due(0, fds[1], now);
        wire.send_due(1, fds[0], now);
        shared.forwarded.store(wire.stats.forwarded, Relaxed);
        shared.lost.store(wire.stats.lost, Relaxed);
        shared.dropped.store(wire.stats.dropped, Relaxed);
        let timeout = wire.next_due().map(|due| {
            let left = due.saturating_duration_since(now);
            libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos().into(),
            }
        });
        let mut pfds = [fds[0], fds[1], stop.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let timeout_ptr = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: three valid pollfds and an optional valid timespec.
        let ready = unsafe { libc::ppoll(pfds.as_mut_ptr(), 3, timeout_ptr, std::ptr::null()) };
        if ready < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            eprintln!(
                "causeway-testbed: WAN emulator: ppoll: {}",
                io::Error::last_os_error()
            );
            return;
        }
        if pfds[2].revents != 0 {
            return;
        }
        let now = Instant::now();
        for d in 0..2 {
            if pfds[d].revents & libc::POLLNVAL != 0 {
                return;
            }
            if pfds[d].revents != 0 {
                wire.receive(d, fds[d], now);
            }
        }
    }
}

struct Frame {
    due: Instant,
    len: usize,
    buf: Buf,
}

struct Emulator {
    delay: Duration,
    loss: f64,
    rng: StdRng,
    queues: [VecDeque<Frame>; 2],
    /// When a direction whose receiver was full may send again.
    retry_at: [Instant; 2],
    /// Free buffers; `allocated` counts all buffers ever made.
    pool: Vec<Buf>,
    allocated: usize,
    /// Buffers lent to the current recvmmsg call.
    batch: Vec<Buf>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    stats: WanStats,
}

impl Emulator {
    fn new(wan: Wan) -> Emulator {
        let empty_iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        Emulator {
            delay: wan.delay,
            loss: wan.loss,
            rng: StdRng::from_entropy(),
            queues: [VecDeque::with_capacity(1024), VecDeque::with_capacity(1024)],
            retry_at: [Instant::now(); 2],
            pool: Vec::with_capacity(1024),
            allocated: 0,
            batch: Vec::with_capacity(BATCH),
            iovs: vec![empty_iov; BATCH],
            // SAFETY: mmsghdr is plain data (null pointers, zero lengths).
            msgs: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            stats: WanStats::default(),
        }
    }

    fn next_due(&self) -> Option<Instant> {
        (0..2)
            .filter_map(|d| self.queues[d].front().map(|f| f.due.max(self.retry_at[d])))
            .min()
    }

    fn take_buf(&mut self) -> Option<Buf> {
        if let Some(buf) = self.pool.pop() {
            return Some(buf);
        }
        if self.allocated >= MAX_FRAMES {
            return None;
        }
        self.allocated += 1;
        Some(Box::new([0; SLOT]))
    }

    /// Points message `i` at `len` bytes from `ptr`.
    fn prepare(&mut self, i: usize, ptr: *mut u8, len: usize) {
        self.iovs[i] = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        let hdr = &mut self.msgs[i].msg_hdr;
        hdr.msg_iov = &raw mut self.iovs[i];
        hdr.msg_iovlen = 1;
        hdr.msg_flags = 0;
        self.msgs[i].msg_len = 0;
    }

    /// Reads what `fd` has (a few batches at most, so sending is not starved).
    fn receive(&mut self, d: usize, fd: RawFd, now: Instant) {
        for _ in 0..4 {
            while self.batch.len() < BATCH {
                match self.take_buf() {
                    Some(buf) => self.batch.push(buf),
                    None => break,
                }
            }
            if self.batch.is_empty() {
                // Queue full: read one frame into a scratch buffer and drop it.
                let mut scratch = [0u8; 64];
                // SAFETY: receiving into a valid buffer.
                let n = unsafe {
                    libc::recv(
                        fd,
                        scratch.as_mut_ptr().cast(),
                        scratch.len(),
                        libc::MSG_TRUNC,
                    )
                };
                if n < 0 {
                    return;
                }
                self.stats.dropped += 1;
                continue;
            }
            let k = self.batch.len();
            for i in 0..k {
                let ptr = self.batch[i].as_mut_ptr();
                self.prepare(i, ptr, SLOT);
            }
            // SAFETY: k messages pointing at k live buffers of SLOT bytes.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.msgs.as_mut_ptr(),
                    k as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            let got = usize::try_from(r).unwrap_or(0);
            let due = now + self.delay;
            for (i, buf) in self.batch.drain(..).enumerate() {
                let truncated = self.msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                if i >= got {
                    self.pool.push(buf);
                } else if truncated {
                    self.stats.dropped += 1;
                    self.pool.push(buf);
                } else if self.loss > 0.0
                    && !is_link_control(&buf[..self.msgs[i].msg_len as usize])
                    && self.rng.gen_bool(self.loss)
                {
                    self.stats.lost += 1;
                    self.pool.push(buf);
                } else {
                    self.queues[d].push_back(Frame {
                        due,
                        len: self.msgs[i].msg_len as usize,
                        buf,
                    });
                }
            }
            if got < k {
                return;
            }
        }
    }

    /// Writes every frame of direction `d` that is due to `fd`. When the
    /// receiving veth is full, keeps the frames and retries a little later:
    /// the emulator adds no loss of its own, it only queues.
    fn send_due(&mut self, d: usize, fd: RawFd, now: Instant) {
        if now < self.retry_at[d] {
            return;
        }
        loop {
            let k = self.queues[d]
                .iter()
                .take(BATCH)
                .take_while(|f| f.due <= now)
                .count();
            if k == 0 {
                return;
            }
            for i in 0..k {
                let frame = &mut self.queues[d][i];
                let (ptr, len) = (frame.buf.as_mut_ptr(), frame.len);
                self.prepare(i, ptr, len);
            }
            // SAFETY: k messages pointing at k queued frames.
            let r =
                unsafe { libc::sendmmsg(fd, self.msgs.as_mut_ptr(), k as u32, libc::MSG_DONTWAIT) };
            // After a partial send the next call reports the error.
            let sent = match usize::try_from(r) {
                Ok(sent) => sent,
                Err(_) => match io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENOBUFS | libc::EAGAIN) => {
                        self.retry_at[d] = now + RETRY;
                        return;
                    }
                    Some(libc::EINTR) => 0,
                    // Anything else (link down, frame too big): drop this frame.
                    _ => {
                        self.stats.dropped += 1;
                        1
                    }
                },
            };
            self.stats.forwarded += sent as u64;
            for frame in self.queues[d].drain(..sent) {
                self.pool.push(frame.buf);
            }
        }
    }
}

/// ARP, or IPv6 neighbour/router discovery (ICMPv6 133–137) without
/// extension headers: frames a routed WAN never carries.
fn is_link_control(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x06]) => true,
        Some([0x86, 0xdd]) => {
            frame.get(20) == Some(&58) && matches!(frame.get(54), Some(133..=137))
        }
        _ => false,
    }
}
