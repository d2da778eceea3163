//! The wire protocol between `causeway-bench client` and `causeway-bench
//! server`.
//!
//! Everything goes to one port (TCP and UDP, [`DEFAULT_PORT`]), so that a
//! single allow rule or firewall hole covers a test across any tunnel.
//!
//! * Every TCP connection starts with one ASCII line: [`HELLO`] followed by
//!   its role: `control`, `data <test id> <stream>` or `rr <test id>`.
//! * On the control connection the client sends a [`ClientMsg::Start`] with
//!   the [`TestSpec`]; the server answers [`ServerMsg::Accepted`] (or
//!   [`ServerMsg::Refused`] while another test runs), then one
//!   [`ServerMsg::Interval`] per second and, after the client's
//!   [`ClientMsg::Done`], one [`ServerMsg::Result`]. Messages are JSON, one
//!   per line.
//! * Data connections carry bytes client → server, counted by the server.
//! * `rr` connections echo: the server writes back whatever it reads.
//! * UDP datagrams start with a 32-byte [`Datagram`] header. Data datagrams
//!   are counted (loss, reordering, jitter); probes are echoed at once, with
//!   no test running too (used to time tunnel establishment).

use std::io::{self, BufRead, Write};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The port the server listens on, for TCP and UDP.
pub(crate) const DEFAULT_PORT: u16 = 5211;

/// First word of every connection's first line.
pub(crate) const HELLO: &str = "CAUSEWAY-BENCH/1";

/// Longest line accepted on a control connection.
const MAX_LINE: usize = 64 * 1024;

/// What a test measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// Bulk TCP, client → server, over `streams` connections.
    Tcp,
    /// UDP datagrams at `bitrate`: throughput, loss, jitter.
    Udp,
    /// Request/response round trips of `len` bytes over one TCP connection,
    /// optionally beside `load_streams` bulk TCP streams.
    Rr,
}

/// A test, as the client asks for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct TestSpec {
    /// Random id that the data connections and datagrams carry.
    pub(crate) id: u64,
    pub(crate) kind: Kind,
    /// Bulk TCP streams (TCP tests).
    pub(crate) streams: u32,
    /// Bulk TCP streams beside the round trips (RR tests).
    pub(crate) load_streams: u32,
    /// How long the client sends, in seconds.
    pub(crate) seconds: f64,
    /// UDP payload bits per second; 0 means as fast as possible.
    pub(crate) bitrate: u64,
    /// UDP datagram payload or RR message size, bytes.
    pub(crate) len: u32,
}

/// Client → server, on the control connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ClientMsg {
    /// Run this test.
    Start(TestSpec),
    /// The client stopped sending: all data connections are shut down, and
    /// this many UDP datagrams (and payload bytes) were sent.
    Done { sent_packets: u64, sent_bytes: u64 },
}

/// Server → client, on the control connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ServerMsg {
    /// The test is registered: open the data connections.
    Accepted,
    /// The test cannot run, e.g. because another one is running.
    Refused { reason: String },
    /// Received during second `second` (1-based) of the test.
    Interval {
        second: u32,
        bytes: u64,
        packets: u64,
    },
    /// The final count.
    Result(ServerResult),
}

/// What the server received.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ServerResult {
    /// Payload bytes received (TCP data streams, or UDP data payload).
    pub(crate) bytes: u64,
    /// From the first byte received to the last (TCP: to the last end of
    /// stream), seconds.
    pub(crate) seconds: f64,
    /// Bytes per data stream, in stream order.
    pub(crate) stream_bytes: Vec<u64>,
    /// UDP data datagrams received.
    pub(crate) packets: u64,
    /// UDP datagrams that arrived after one with a higher sequence number.
    pub(crate) out_of_order: u64,
    /// Interarrival jitter (RFC 3550), milliseconds.
    pub(crate) jitter_ms: f64,
}

/// Writes one message as a JSON line.
pub(crate) fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one JSON line; `Ok(None)` at end of stream.
pub(crate) fn recv<T: for<'de> Deserialize<'de>>(r: &mut impl BufRead) -> io::Result<Option<T>> {
    let mut line = Vec::new();
    let n = io::Read::take(&mut *r, MAX_LINE as u64).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "control line too long or cut",
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// What a UDP datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DatagramKind {
    Data = 0,
    Probe = 1,
    ProbeReply = 2,
}

/// The header at the start of every UDP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Datagram {
    pub(crate) kind: DatagramKind,
    pub(crate) id: u64,
    pub(crate) seq: u64,
    /// Sender's clock, nanoseconds since its own epoch (only differences
    /// between datagrams of one sender are used).
    pub(crate) sent_ns: u64,
}

impl Datagram {
    /// Header size; datagrams are at least this long.
    pub(crate) const LEN: usize = 32;
    const MAGIC: [u8; 4] = *b"CWB1";

    /// Writes the header into the first [`Datagram::LEN`] bytes of `buf`.
    pub(crate) fn write(&self, buf: &mut [u8]) {
        if buf.len() < Self::LEN {
            return;
        }
        buf[..4].copy_from_slice(&Self::MAGIC);
        buf[4] = self.kind as u8;
        buf[5..8].fill(0);
        buf[8..16].copy_from_slice(&self.id.to_be_bytes());
        buf[16..24].copy_from_slice(&self.seq.to_be_bytes());
        buf[24..32].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    /// Parses a header; `None` for anything that is not ours.
    pub(crate) fn parse(buf: &[u8]) -> Option<Datagram> {
        if buf.len() < Self::LEN || buf[..4] != Self::MAGIC {
            return None;
        }
        let kind = match buf[4] {
            0 => DatagramKind::Data,
            1 => DatagramKind::Probe,
            2 => DatagramKind::ProbeReply,
            _ => return None,
        };
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[at..at + 8]);
            u64::from_be_bytes(b)
        };
        Some(Datagram {
            kind,
            id: word(8),
            seq: word(16),
            sent_ns: word(24),
        })
    }
}

/// Nanoseconds since `epoch`, saturating.
pub(crate) fn nanos_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Parses a rate such as `1G`, `500M`, `100k` or `1000000` (bits per second).
pub(crate) fn parse_bitrate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let value: f64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a rate; write e.g. 1G, 500M, 100k"))?;
    let scale = match unit.trim_end_matches("bit/s").trim_end_matches("bps") {
        "" => 1.0,
        "k" | "K" => 1e3,
        "m" | "M" => 1e6,
        "g" | "G" => 1e9,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use k, M or G")),
    };
    if !(value >= 0.0 && value.is_finite()) {
        return Err(format!("{s:?} is not a rate"));
    }
    Ok((value * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_round_trips() {
        let d = Datagram {
            kind: DatagramKind::Probe,
            id: 7,
            seq: u64::MAX - 1,
            sent_ns: 123_456,
        };
        let mut buf = [0u8; 64];
        d.write(&mut buf);
        assert_eq!(Datagram::parse(&buf), Some(d));
        assert_eq!(Datagram::parse(&buf[..31]), None);
        buf[0] = b'X';
        assert_eq!(Datagram::parse(&buf), None);
    }

    #[test]
    fn messages_are_json_lines() {
        let spec = TestSpec {
            id: 1,
            kind: Kind::Udp,
            streams: 1,
            load_streams: 0,
            seconds: 2.5,
            bitrate: 1_000_000,
            len: 1200,
        };
        let mut buf = Vec::new();
        send(&mut buf, &ClientMsg::Start(spec.clone())).expect("send");
        send(
            &mut buf,
            &ClientMsg::Done {
                sent_packets: 3,
                sent_bytes: 3600,
            },
        )
        .expect("send");
        assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 2);
        let mut r = io::BufReader::new(&buf[..]);
        assert_eq!(
            recv::<ClientMsg>(&mut r).expect("recv"),
            Some(ClientMsg::Start(spec))
        );
        assert_eq!(
            recv::<ClientMsg>(&mut r).expect("recv"),
            Some(ClientMsg::Done {
                sent_packets: 3,
                sent_bytes: 3600
            })
        );
        assert_eq!(recv::<ClientMsg>(&mut r).expect("recv"), None);
    }

    #[test]
    fn bitrates_parse() {
        assert_eq!(parse_bitrate("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bitrate("2.5M"), Ok(2_500_000));
        assert_eq!(parse_bitrate("100k"), Ok(100_000));
        assert_eq!(parse_bitrate("1000"), Ok(1000));
        assert_eq!(parse_bitrate("1Gbit/s"), Ok(1_000_000_000));
        assert!(parse_bitrate("fast").is_err());
        assert!(parse_bitrate("1T").is_err());
    }
}
