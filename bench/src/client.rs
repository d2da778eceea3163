//! `causeway-bench client`: runs one test against a `causeway-bench server`.

use std::io::{self, BufReader, IsTerminal as _, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::proto::{
    self, ClientMsg, Datagram, DatagramKind, HELLO, Kind, ServerMsg, ServerResult, TestSpec,
};
use crate::stats;
use crate::udp;

/// Write size of bulk TCP streams.
const WRITE_BUF: usize = 128 * 1024;
/// Most round-trip samples kept (the rest are counted but not stored).
const MAX_SAMPLES: usize = 20_000_000;

/// What to run.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) server: SocketAddr,
    pub(crate) kind: Kind,
    pub(crate) streams: u32,
    pub(crate) load_streams: u32,
    pub(crate) seconds: f64,
    pub(crate) bitrate: u64,
    pub(crate) len: u32,
    pub(crate) connect_timeout: Duration,
    /// Print a line per second (only when stdout is a terminal).
    pub(crate) progress: bool,
}

/// The outcome of one test, as `--json` prints it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) kind: String,
    pub(crate) server: String,
    pub(crate) streams: u32,
    pub(crate) load_streams: u32,
    /// Requested sending time, seconds.
    pub(crate) seconds: f64,
    /// Payload bytes the server received (bulk streams or UDP).
    pub(crate) bytes: u64,
    /// Payload bytes the client sent.
    pub(crate) sent_bytes: u64,
    /// The server's receive window (first to last byte), seconds.
    pub(crate) duration: f64,
    /// `bytes` over `duration`.
    pub(crate) bits_per_second: f64,
    /// Bytes each bulk stream delivered.
    pub(crate) stream_bytes: Vec<u64>,
    /// The server's per-second counts.
    pub(crate) intervals: Vec<Interval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) udp: Option<UdpReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) latency: Option<Latency>,
}

/// One second as the server counted it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Interval {
    pub(crate) second: u32,
    pub(crate) bits_per_second: f64,
    pub(crate) packets: u64,
}

/// UDP results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct UdpReport {
    pub(crate) target_bits_per_second: u64,
    pub(crate) len: u32,
    pub(crate) sent_packets: u64,
    pub(crate) received_packets: u64,
    pub(crate) lost_packets: u64,
    pub(crate) loss_percent: f64,
    pub(crate) out_of_order: u64,
    pub(crate) jitter_ms: f64,
}

/// Round-trip times of `len`-byte messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Latency {
    pub(crate) len: u32,
    pub(crate) samples: u64,
    pub(crate) min_ms: f64,
    pub(crate) mean_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

/// What a worker thread sent.
#[derive(Default)]
struct Sent {
    bytes: u64,
    packets: u64,
    latency: Option<Latency>,
}

/// Runs the test and returns its report.
pub(crate) fn run(opts: &Options) -> anyhow::Result<Report> {
    let spec = TestSpec {
        id: rand::random(),
        kind: opts.kind,
        streams: if opts.kind == Kind::Tcp {
            opts.streams
        } else {
            0
        },
        load_streams: if opts.kind == Kind::Rr {
            opts.load_streams
        } else {
            0
        },
        seconds: opts.seconds,
        bitrate: opts.bitrate,
        len: opts.len,
    };
    ensure!(
        opts.seconds > 0.0 && opts.seconds.is_finite(),
        "--time must be positive"
    );
    let mut control = connect(opts, "control", "")?;
    proto::send(&mut control, &ClientMsg::Start(spec.clone()))?;
    let mut reader = BufReader::new(control.try_clone()?);
    control.set_read_timeout(Some(opts.connect_timeout.max(Duration::from_secs(5))))?;
    match proto::recv::<ServerMsg>(&mut reader)
        .context("waiting for the server to accept the test")?
    {
        Some(ServerMsg::Accepted) => {}
        Some(ServerMsg::Refused { reason }) => bail!("the server refused the test: {reason}"),
        other => bail!("unexpected answer from the server: {other:?}"),
    }
    control.set_read_timeout(None)?;
    let messages = spawn_reader(reader);

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<JoinHandle<anyhow::Result<Sent>>> = match opts.kind {
        Kind::Tcp => (0..opts.streams)
            .map(|i| spawn_stream(opts, &spec, i, Duration::ZERO, &stop))
            .collect(),
        Kind::Udp => {
            let (o, s) = (opts.clone(), spec.clone());
            vec![thread::spawn(move || send_udp(&o, &s))]
        }
        Kind::Rr => {
            let warmup = if opts.load_streams > 0 {
                Duration::from_secs_f64((opts.seconds / 4.0).min(1.0))
            } else {
                Duration::ZERO
            };
            let mut w: Vec<_> = (0..opts.load_streams)
                .map(|i| spawn_stream(opts, &spec, i, warmup, &stop))
                .collect();
            let (o, s, st) = (opts.clone(), spec.clone(), Arc::clone(&stop));
            w.push(thread::spawn(move || round_trips(&o, &s, warmup, &st)));
            w
        }
    };
    let tty = opts.progress && io::stdout().is_terminal();
    let mut intervals = Vec::new();
    let mut result: Option<ServerResult> = None;
    let wait_for = |w: &[JoinHandle<_>]| w.iter().all(JoinHandle::is_finished);
    while !wait_for(&workers) {
        if let Some(msg) = next(&messages, Duration::from_millis(50))? {
            handle_msg(msg, tty, &mut intervals, &mut result)?;
        }
    }
    let mut sent = Sent::default();
    let mut errors = Vec::new();
    for w in workers {
        match w.join() {
            Ok(Ok(s)) => {
                sent.bytes += s.bytes;
                sent.packets += s.packets;
                sent.latency = sent.latency.or(s.latency);
            }
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push("a worker thread panicked".into()),
        }
    }
    proto::send(
        &mut control,
        &ClientMsg::Done {
            sent_packets: sent.packets,
            sent_bytes: sent.bytes,
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while result.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "the server sent no result");
        if let Some(msg) = next(&messages, left)? {
            handle_msg(msg, tty, &mut intervals, &mut result)?;
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    let result = result.unwrap_or_default();
    let udp = (opts.kind == Kind::Udp).then(|| {
        let lost = sent.packets.saturating_sub(result.packets);
        UdpReport {
            target_bits_per_second: opts.bitrate,
            len: opts.len,
            sent_packets: sent.packets,
            received_packets: result.packets,
            lost_packets: lost,
            loss_percent: if sent.packets == 0 {
                0.0
            } else {
                100.0 * lost as f64 / sent.packets as f64
            },
            out_of_order: result.out_of_order,
            jitter_ms: result.jitter_ms,
        }
    });
    if opts.kind == Kind::Tcp {
        ensure!(result.bytes > 0, "no data reached the server");
    }
    if opts.kind == Kind::Udp {
        ensure!(
            result.packets > 0,
            "no datagram reached the server ({} sent)",
            sent.packets
        );
    }
    Ok(Report {
        kind: format!("{:?}", opts.kind).to_lowercase(),
        server: opts.server.to_string(),
        streams: spec.streams,
        load_streams: spec.load_streams,
        seconds: opts.seconds,
        bytes: result.bytes,
        sent_bytes: sent.bytes,
        duration: result.seconds,
        bits_per_second: if result.seconds > 0.0 {
            result.bytes as f64 * 8.0 / result.seconds
        } else {
            0.0
        },
        stream_bytes: result.stream_bytes,
        intervals,
        udp,
        latency: sent.latency,
    })
}

fn handle_msg(
    msg: ServerMsg,
    tty: bool,
    intervals: &mut Vec<Interval>,
    result: &mut Option<ServerResult>,
) -> anyhow::Result<()> {
    match msg {
        ServerMsg::Interval {
            second,
            bytes,
            packets,
        } => {
            let interval = Interval {
                second,
                bits_per_second: bytes as f64 * 8.0,
                packets,
            };
            if tty {
                let pkts = if packets > 0 {
                    format!(", {packets} datagrams")
                } else {
                    String::new()
                };
                println!(
                    "[{second:>4} s] {}{pkts}",
                    stats::rate(interval.bits_per_second)
                );
            }
            intervals.push(interval);
        }
        ServerMsg::Result(r) => *result = Some(r),
        ServerMsg::Refused { reason } => bail!("the server aborted the test: {reason}"),
        ServerMsg::Accepted => {}
    }
    Ok(())
}

fn next(
    messages: &Receiver<Option<ServerMsg>>,
    wait: Duration,
) -> anyhow::Result<Option<ServerMsg>> {
    match messages.recv_timeout(wait) {
        Ok(Some(msg)) => Ok(Some(msg)),
        Ok(None) | Err(RecvTimeoutError::Disconnected) => {
            bail!("the server closed the control connection")
        }
        Err(RecvTimeoutError::Timeout) => Ok(None),
    }
}

fn spawn_reader(mut reader: BufReader<TcpStream>) -> Receiver<Option<ServerMsg>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        loop {
            let msg = proto::recv::<ServerMsg>(&mut reader).ok().flatten();
            let end = msg.is_none();
            if tx.send(msg).is_err() || end {
                break;
            }
        }
    });
    rx
}

/// A TCP connection to the server that has said who it is.
fn connect(opts: &Options, role: &str, args: &str) -> anyhow::Result<TcpStream> {
    let conn =
        TcpStream::connect_timeout(&opts.server, opts.connect_timeout).with_context(|| {
            format!(
                "connecting to {} (is `causeway-bench server` running there?)",
                opts.server
            )
        })?;
    let mut hello = format!("{HELLO} {role}");
    if !args.is_empty() {
        hello.push(' ');
        hello.push_str(args);
    }
    hello.push('\n');
    (&conn).write_all(hello.as_bytes())?;
    Ok(conn)
}

/// A bulk stream that starts after `delay` (ramping load) and sends for the
/// test's time, or until `stop`.
fn spawn_stream(
    opts: &Options,
    spec: &TestSpec,
    index: u32,
    delay: Duration,
    stop: &Arc<AtomicBool>,
) -> JoinHandle<anyhow::Result<Sent>> {
    let (opts, id, stop) = (opts.clone(), spec.id, Arc::clone(stop));
    let duration = Duration::from_secs_f64(opts.seconds) + delay;
    thread::spawn(move || {
        let start = Instant::now();
        let conn = connect(&opts, "data", &format!("{id} {index}"))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))?;
        let buf = vec![0x5a_u8; WRITE_BUF];
        let mut sent = 0u64;
        while start.elapsed() < duration && !stop.load(Relaxed) {
            match (&conn).write(&buf) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("sending"),
            }
        }
        conn.shutdown(Shutdown::Write)?;
        // Wait for the server to close, so it has counted everything.
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let _ = (&conn).read(&mut [0u8; 16]);
        Ok(Sent {
            bytes: sent,
            ..Sent::default()
        })
    })
}

fn send_udp(opts: &Options, spec: &TestSpec) -> anyhow::Result<Sent> {
    let local: SocketAddr = if opts.server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()?;
    let socket = UdpSocket::bind(local)?;
    socket.connect(opts.server)?;
    let len = opts.len as usize;
    let mut bufs: Vec<Vec<u8>> = (0..udp::BATCH).map(|_| vec![0xa5u8; len]).collect();
    let per_second = if opts.bitrate == 0 {
        f64::INFINITY
    } else {
        opts.bitrate as f64 / (len as f64 * 8.0)
    };
    let duration = Duration::from_secs_f64(opts.seconds);
    let epoch = Instant::now();
    let mut seq = 0u64;
    loop {
        let elapsed = epoch.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = if per_second.is_infinite() {
            udp::BATCH as u64
        } else {
            ((elapsed.as_secs_f64() * per_second) as u64 + 1).saturating_sub(seq)
        };
        if due == 0 {
            let next = Duration::from_secs_f64((seq as f64) / per_second);
            thread::sleep(next.saturating_sub(elapsed).min(Duration::from_millis(1)));
            continue;
        }
        let n = (due as usize).min(udp::BATCH);
        let now = proto::nanos_since(epoch);
        for (i, buf) in bufs.iter_mut().take(n).enumerate() {
            Datagram {
                kind: DatagramKind::Data,
                id: spec.id,
                seq: seq + i as u64,
                sent_ns: now,
            }
            .write(buf);
        }
        let refs: Vec<&[u8]> = bufs.iter().take(n).map(Vec::as_slice).collect();
        match udp::send_batch(&socket, &refs) {
            Ok(sent) => seq += sent as u64,
            // A full queue, or an ICMP error about an earlier datagram.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(
                        libc::ENOBUFS
                            | libc::EAGAIN
                            | libc::ECONNREFUSED
                            | libc::EHOSTUNREACH
                            | libc::ENETUNREACH
                    )
                ) =>
            {
                thread::sleep(Duration::from_micros(50));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("sending UDP"),
        }
    }
    Ok(Sent {
        bytes: seq * len as u64,
        packets: seq,
        latency: None,
    })
}

fn round_trips(
    opts: &Options,
    spec: &TestSpec,
    warmup: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<Sent> {
    let result = measure_round_trips(opts, spec, warmup);
    stop.store(true, Relaxed);
    result
}

fn measure_round_trips(opts: &Options, spec: &TestSpec, warmup: Duration) -> anyhow::Result<Sent> {
    let mut conn = connect(opts, "rr", &spec.id.to_string())?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let len = opts.len as usize;
    let request = vec![0x42u8; len];
    let mut response = vec![0u8; len];
    thread::sleep(warmup);
    let tty = opts.progress && io::stdout().is_terminal();
    let mut samples: Vec<u64> = Vec::with_capacity(1 << 16);
    let mut count = 0u64;
    let start = Instant::now();
    let duration = Duration::from_secs_f64(opts.seconds);
    let (mut second, mut since) = (1u32, 0usize);
    while start.elapsed() < duration {
        let t = Instant::now();
        conn.write_all(&request)?;
        conn.read_exact(&mut response)
            .context("waiting for the echo (round trip timed out?)")?;
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        count += 1;
        if samples.len() < MAX_SAMPLES {
            samples.push(ns);
        }
        if tty && start.elapsed() >= Duration::from_secs(u64::from(second)) {
            let mut window = samples[since..].to_vec();
            window.sort_unstable();
            println!(
                "[{second:>4} s] {} round trips, p50 {:.3} ms, p99 {:.3} ms",
                window.len(),
                stats::percentile_sorted(&window, 50.0) / 1e6,
                stats::percentile_sorted(&window, 99.0) / 1e6
            );
            since = samples.len();
            second += 1;
        }
    }
    conn.shutdown(Shutdown::Write)?;
    ensure!(!samples.is_empty(), "no round trip completed");
    samples.sort_unstable();
    let ms = |p: f64| stats::percentile_sorted(&samples, p) / 1e6;
    let latency = Latency {
        len: opts.len,
        samples: count,
        min_ms: samples[0] as f64 / 1e6,
        mean_ms: samples.iter().map(|&s| s as f64).sum::<f64>() / samples.len() as f64 / 1e6,
        p50_ms: ms(50.0),
        p90_ms: ms(90.0),
        p99_ms: ms(99.0),
        p999_ms: ms(99.9),
        max_ms: samples[samples.len() - 1] as f64 / 1e6,
    };
    Ok(Sent {
        bytes: count * len as u64,
        packets: 0,
        latency: Some(latency),
    })
}

/// The human summary printed without `--json`.
pub(crate) fn summary(r: &Report) -> String {
    let mut s = String::new();
    match (&r.udp, &r.latency) {
        (Some(u), _) => {
            s += &format!(
                "udp     {} received over {:.2} s ({} target, {}-byte datagrams)\n",
                stats::rate(r.bits_per_second),
                r.duration,
                if u.target_bits_per_second == 0 {
                    "unlimited".to_owned()
                } else {
                    stats::rate(u.target_bits_per_second as f64)
                },
                u.len
            );
            s += &format!(
                "        {} sent, {} received, {} lost ({:.3} %), {} out of order, jitter {:.3} ms\n",
                u.sent_packets,
                u.received_packets,
                u.lost_packets,
                u.loss_percent,
                u.out_of_order,
                u.jitter_ms
            );
        }
        (None, Some(l)) => {
            let load = if r.load_streams > 0 {
                format!(
                    " beside {} bulk streams ({})",
                    r.load_streams,
                    stats::rate(r.bits_per_second)
                )
            } else {
                String::new()
            };
            s += &format!(
                "rr      {} round trips of {} bytes{load}\n",
                l.samples, l.len
            );
            s += &format!(
                "        min {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms\n",
                l.min_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
            );
        }
        (None, None) => {
            s += &format!(
                "tcp     {} over {:.2} s, {} stream(s), {} bytes received\n",
                stats::rate(r.bits_per_second),
                r.duration,
                r.streams,
                r.bytes
            );
        }
    }
    s
}
