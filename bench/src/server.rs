//! `causeway-bench server`: counts what clients send, echoes round trips
//! and probes. One test at a time (like iperf3); probes are echoed always.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::proto::{
    self, ClientMsg, Datagram, DatagramKind, HELLO, Kind, ServerMsg, ServerResult, TestSpec,
};
use crate::udp::{self, RecvBufs};

/// How long a UDP test waits for stragglers after the client is done and
/// the last datagram arrived.
const UDP_QUIET: Duration = Duration::from_millis(250);
/// Longest wait for stragglers after the client is done.
const DONE_GRACE: Duration = Duration::from_secs(5);
/// Most data streams per test.
const MAX_STREAMS: u32 = 128;
/// UDP socket receive buffer: a few milliseconds at several Gbit/s.
const UDP_RECEIVE_BUFFER: usize = 16 << 20;
/// Read buffer of a data connection.
const READ_BUF: usize = 256 * 1024;

/// Binds TCP and UDP on `bind` (`[::]` falls back to `0.0.0.0` when the
/// host has no IPv6), prints one `listening on …` line on stdout and serves
/// until killed.
pub(crate) fn run(bind: SocketAddr) -> anyhow::Result<()> {
    let (listener, socket) = match bind_both(bind) {
        Err(e) if bind.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            let v4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), bind.port());
            bind_both(v4).with_context(|| format!("binding {bind} ({e}) and {v4}"))?
        }
        other => other.with_context(|| format!("binding {bind} (TCP and UDP)"))?,
    };
    let shared = Arc::new(Shared {
        test: Mutex::new(None),
        epoch: Instant::now(),
    });
    let udp_shared = Arc::clone(&shared);
    thread::Builder::new()
        .name("udp".into())
        .spawn(move || udp_loop(&socket, &udp_shared))?;
    let mut out = io::stdout().lock();
    writeln!(out, "listening on {} (TCP and UDP)", listener.local_addr()?)?;
    out.flush()?;
    drop(out);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let shared = Arc::clone(&shared);
        thread::spawn(move || {
            let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if let Err(e) = handle(conn, &shared) {
                eprintln!("causeway-bench server: connection from {peer}: {e}");
            }
        });
    }
    Ok(())
}

fn bind_both(addr: SocketAddr) -> io::Result<(TcpListener, UdpSocket)> {
    let listener = TcpListener::bind(addr)?;
    let socket = UdpSocket::bind(listener.local_addr()?)?;
    Ok((listener, socket))
}

struct Shared {
    test: Mutex<Option<Arc<Test>>>,
    epoch: Instant,
}

impl Shared {
    fn current(&self) -> MutexGuard<'_, Option<Arc<Test>>> {
        self.test.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn test(&self, id: u64) -> Option<Arc<Test>> {
        self.current().as_ref().filter(|t| t.spec.id == id).cloned()
    }
}

/// The running test's counters.
struct Test {
    spec: TestSpec,
    bytes: AtomicU64,
    packets: AtomicU64,
    stream_bytes: Vec<AtomicU64>,
    ended_streams: AtomicU32,
    window: Mutex<Window>,
    udp: Mutex<UdpStats>,
}

/// First and last arrival.
#[derive(Default)]
struct Window {
    first: Option<Instant>,
    last: Option<Instant>,
}

#[derive(Default)]
struct UdpStats {
    max_seq: Option<u64>,
    out_of_order: u64,
    jitter_ns: f64,
    last_transit: Option<i128>,
}

impl Test {
    fn new(spec: TestSpec) -> Test {
        let streams = match spec.kind {
            Kind::Tcp => spec.streams,
            Kind::Rr => spec.load_streams,
            Kind::Udp => 0,
        };
        Test {
            stream_bytes: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            spec,
            bytes: AtomicU64::new(0),
            packets: AtomicU64::new(0),
            ended_streams: AtomicU32::new(0),
            window: Mutex::new(Window::default()),
            udp: Mutex::new(UdpStats::default()),
        }
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn arrived(&self, now: Instant) {
        let mut w = self.window();
        w.first.get_or_insert(now);
        w.last = Some(now);
    }

    fn result(&self) -> ServerResult {
        let w = self.window();
        let seconds = match (w.first, w.last) {
            (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        let udp = self.udp.lock().unwrap_or_else(|e| e.into_inner());
        ServerResult {
            bytes: self.bytes.load(Relaxed),
            seconds,
            stream_bytes: self.stream_bytes.iter().map(|b| b.load(Relaxed)).collect(),
            packets: self.packets.load(Relaxed),
            out_of_order: udp.out_of_order,
            jitter_ms: udp.jitter_ns / 1e6,
        }
    }
}

fn handle(conn: TcpStream, shared: &Shared) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::with_capacity(READ_BUF, conn.try_clone()?);
    let mut line = Vec::new();
    reader.by_ref().take(256).read_until(b'\n', &mut line)?;
    let line = String::from_utf8_lossy(&line);
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.first() != Some(&HELLO) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a causeway-bench client",
        ));
    }
    conn.set_read_timeout(None)?;
    let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
    match (words.get(1).copied(), number(2), number(3)) {
        (Some("control"), _, _) => control(conn, reader, shared),
        (Some("data"), Some(id), Some(stream)) => data(reader, shared, id, stream),
        (Some("rr"), Some(id), _) => echo(conn, reader, shared, id),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown hello {line:?}"),
        )),
    }
}

fn refuse(conn: &mut TcpStream, reason: String) -> io::Result<()> {
    proto::send(conn, &ServerMsg::Refused { reason })
}

fn control(
    mut conn: TcpStream,
    mut reader: BufReader<TcpStream>,
    shared: &Shared,
) -> io::Result<()> {
    let Some(ClientMsg::Start(spec)) = proto::recv::<ClientMsg>(&mut reader)? else {
        return refuse(&mut conn, "expected a start message".into());
    };
    if let Err(reason) = check(&spec) {
        return refuse(&mut conn, reason);
    }
    let test = Arc::new(Test::new(spec.clone()));
    {
        let mut current = shared.current();
        if current.is_some() {
            drop(current);
            return refuse(
                &mut conn,
                "another test is running on this server; try again when it is done".into(),
            );
        }
        *current = Some(Arc::clone(&test));
    }
    let outcome = run_test(&mut conn, reader, &test);
    *shared.current() = None;
    outcome
}

fn check(spec: &TestSpec) -> Result<(), String> {
    if spec.streams > MAX_STREAMS || spec.load_streams > MAX_STREAMS {
        return Err(format!("at most {MAX_STREAMS} streams"));
    }
    if !(spec.seconds > 0.0 && spec.seconds <= 86_400.0) {
        return Err("seconds must be within (0, 86400]".into());
    }
    if spec.kind == Kind::Udp && !(Datagram::LEN as u32..=65_507).contains(&spec.len) {
        return Err(format!(
            "UDP length must be {} to 65507 bytes",
            Datagram::LEN
        ));
    }
    if spec.kind == Kind::Rr && !(1..=65_536).contains(&spec.len) {
        return Err("round-trip message length must be 1 to 65536 bytes".into());
    }
    Ok(())
}

fn run_test(conn: &mut TcpStream, reader: BufReader<TcpStream>, test: &Test) -> io::Result<()> {
    proto::send(conn, &ServerMsg::Accepted)?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = reader;
        loop {
            let msg = proto::recv::<ClientMsg>(&mut reader).ok().flatten();
            let end = msg.is_none();
            if tx.send(msg).is_err() || end {
                break;
            }
        }
    });
    let start = Instant::now();
    let limit = start + Duration::from_secs_f64(test.spec.seconds) + Duration::from_secs(60);
    let (mut second, mut last_bytes, mut last_packets) = (0u32, 0u64, 0u64);
    let mut done_at: Option<Instant> = None;
    loop {
        let tick = start + Duration::from_secs(u64::from(second) + 1);
        let now = Instant::now();
        let wait = tick
            .saturating_duration_since(now)
            .min(Duration::from_millis(20));
        match rx.recv_timeout(wait) {
            Ok(Some(ClientMsg::Done { .. })) => done_at = Some(Instant::now()),
            Ok(Some(ClientMsg::Start(_))) => {}
            Ok(None) | Err(RecvTimeoutError::Disconnected) => return Ok(()), // client went away
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if now >= limit {
            return refuse(conn, "test ran far past its time; aborted".into());
        }
        if now >= tick && done_at.is_none() {
            second += 1;
            let (bytes, packets) = (test.bytes.load(Relaxed), test.packets.load(Relaxed));
            let msg = ServerMsg::Interval {
                second,
                bytes: bytes - last_bytes,
                packets: packets - last_packets,
            };
            (last_bytes, last_packets) = (bytes, packets);
            proto::send(conn, &msg)?;
        }
        if let Some(done) = done_at {
            let waited = now.duration_since(done);
            let finished = match test.spec.kind {
                Kind::Tcp | Kind::Rr => {
                    test.ended_streams.load(Relaxed) as usize >= test.stream_bytes.len()
                }
                Kind::Udp => {
                    let last = test.window().last.unwrap_or(done).max(done);
                    now.duration_since(last) >= UDP_QUIET
                }
            };
            if finished || waited >= DONE_GRACE {
                break;
            }
        }
    }
    proto::send(conn, &ServerMsg::Result(test.result()))
}

fn data(mut reader: BufReader<TcpStream>, shared: &Shared, id: u64, stream: u64) -> io::Result<()> {
    let Some(test) = shared.test(id) else {
        return Err(io::Error::other(format!(
            "data for test {id}, which is not running"
        )));
    };
    let Some(counter) = usize::try_from(stream)
        .ok()
        .and_then(|s| test.stream_bytes.get(s))
    else {
        return Err(io::Error::other(format!("stream {stream} out of range")));
    };
    let mut buf = vec![0u8; READ_BUF];
    let mut first = true;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                test.ended_streams.fetch_add(1, Relaxed);
                return Err(e);
            }
        };
        if first {
            test.arrived(Instant::now());
            first = false;
        }
        counter.fetch_add(n as u64, Relaxed);
        test.bytes.fetch_add(n as u64, Relaxed);
    }
    test.arrived(Instant::now());
    test.ended_streams.fetch_add(1, Relaxed);
    Ok(())
}

fn echo(
    mut conn: TcpStream,
    mut reader: BufReader<TcpStream>,
    shared: &Shared,
    id: u64,
) -> io::Result<()> {
    if shared.test(id).is_none() {
        return Err(io::Error::other(format!(
            "round trips for test {id}, which is not running"
        )));
    }
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        conn.write_all(&buf[..n])?;
    }
}

fn udp_loop(socket: &UdpSocket, shared: &Shared) {
    if let Err(e) = socket.set_read_timeout(Some(Duration::from_millis(200))) {
        eprintln!("causeway-bench server: UDP socket: {e}");
        return;
    }
    udp::grow_receive_buffer(socket, UDP_RECEIVE_BUFFER);
    let mut bufs = RecvBufs::new(65_536);
    let mut reply = [0u8; Datagram::LEN];
    loop {
        let n = match udp::recv_batch(socket, &mut bufs) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                eprintln!("causeway-bench server: UDP receive: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let now = Instant::now();
        let arrival_ns = i128::from(proto::nanos_since(shared.epoch));
        let mut test: Option<Arc<Test>> = None;
        for i in 0..n {
            let Some(d) = Datagram::parse(bufs.get(i)) else {
                continue;
            };
            match d.kind {
                DatagramKind::Probe => {
                    if let Some(from) = bufs.addr(i) {
                        Datagram {
                            kind: DatagramKind::ProbeReply,
                            ..d
                        }
                        .write(&mut reply);
                        let _ = socket.send_to(&reply, from);
                    }
                }
                DatagramKind::ProbeReply => {}
                DatagramKind::Data => {
                    if test.as_ref().is_none_or(|t| t.spec.id != d.id) {
                        test = shared.test(d.id);
                    }
                    let Some(t) = &test else { continue };
                    t.packets.fetch_add(1, Relaxed);
                    t.bytes.fetch_add(bufs.get(i).len() as u64, Relaxed);
                    let mut s = t.udp.lock().unwrap_or_else(|e| e.into_inner());
                    match s.max_seq {
                        Some(max) if d.seq < max => s.out_of_order += 1,
                        _ => s.max_seq = Some(d.seq),
                    }
                    let transit = arrival_ns - i128::from(d.sent_ns);
                    if let Some(last) = s.last_transit {
                        let delta = (transit - last).abs() as f64;
                        s.jitter_ns += (delta - s.jitter_ns) / 16.0;
                    }
                    s.last_transit = Some(transit);
                }
            }
        }
        if let Some(t) = &test {
            t.arrived(now);
        }
    }
}
