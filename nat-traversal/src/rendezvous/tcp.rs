//! The rendezvous over TCP with TLS, for sites that can send no UDP (an
//! egress firewall that lets only TCP out, typically to port 443).
//!
//! One TLS 1.3 stream carries what a QUIC connection carries: the bytes of
//! the control stream and the relay datagrams, as records
//!
//! ```text
//! type (1 byte) | length (2 bytes, big-endian) | body
//! ```
//!
//! - `0` control: bytes of the control stream (the same framed messages
//!   as on QUIC);
//! - `1` datagram: one relay datagram (the same header as on QUIC; a
//!   whole WireGuard packet fits, so it is never fragmented);
//! - `2` close: a close code (4 bytes, big-endian) and a UTF-8 reason, the
//!   last record on the stream.
//!
//! Both ends send an empty control record every [`KEEP_ALIVE`] (5 s) and
//! give up on a connection that sent nothing for [`IDLE_TIMEOUT`] (15 s),
//! as QUIC's keep-alive and idle timeout do: a TCP connection through a NAT
//! that forgot it would otherwise look alive for many minutes.
//!
//! Authentication is the same as on QUIC: the proofs are bound to this TLS
//! session's exporter. A [`Carrier`] is either kind of connection, for
//! the code that sends datagrams and closes.

use std::io;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};

use super::proto::CloseCode;
use super::tls::{IDLE_TIMEOUT, KEEP_ALIVE};

/// The ALPN of the rendezvous protocol over TCP (the records differ from
/// QUIC, so the protocol name does too).
pub(crate) const TCP_ALPN: &[u8] = b"causeway-rendezvous-tcp/1";
/// Record header: type and length.
const HEADER: usize = 3;
/// The largest record body.
const MAX_BODY: usize = u16::MAX as usize;
/// The largest relay datagram over TCP (a record's body).
const MAX_DATAGRAM: usize = MAX_BODY;
/// Records queued for the writer; relay datagrams beyond it are dropped
/// (like a QUIC datagram send buffer), control records wait.
const QUEUE: usize = 512;
/// The writer hands TLS this much at most in one write.
const WRITE_BATCH: usize = 64 * 1024;
/// The longest close reason sent.
const MAX_REASON: usize = 256;

pub(crate) const CONTROL: u8 = 0;
pub(crate) const DATAGRAM: u8 = 1;
pub(crate) const CLOSE: u8 = 2;

/// One record, as read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// Bytes of the control stream.
    Control(Bytes),
    /// A relay datagram.
    Datagram(Bytes),
    /// The other end closed with this code and reason.
    Close(u64, String),
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    #[error("unknown record type {0}")]
    UnknownType(u8),
    #[error("a close record of {0} bytes (at least 4)")]
    ShortClose(usize),
}

pub(crate) fn encode(kind: u8, body: &[u8]) -> Bytes {
    let len = body.len().min(MAX_BODY);
    let mut out = BytesMut::with_capacity(HEADER + len);
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&body[..len]);
    out.freeze()
}

/// Control stream bytes as records (split at [`MAX_BODY`]).
fn encode_control(bytes: &[u8]) -> impl Iterator<Item = Bytes> + '_ {
    bytes.chunks(MAX_BODY).map(|c| encode(CONTROL, c))
}

fn encode_close(code: CloseCode, reason: &[u8]) -> Bytes {
    let mut body = code.as_u32().to_be_bytes().to_vec();
    body.extend_from_slice(&reason[..reason.len().min(MAX_REASON)]);
    encode(CLOSE, &body)
}

/// Takes one whole record off the front of `buf`, if there is one.
pub(crate) fn decode(buf: &mut BytesMut) -> Result<Option<Record>, RecordError> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
    if buf.len() < HEADER + len {
        return Ok(None);
    }
    let kind = buf[0];
    buf.advance(HEADER);
    let body = buf.split_to(len).freeze();
    match kind {
        CONTROL => Ok(Some(Record::Control(body))),
        DATAGRAM => Ok(Some(Record::Datagram(body))),
        CLOSE if body.len() >= 4 => {
            let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let reason = String::from_utf8_lossy(&body[4..]).into_owned();
            Ok(Some(Record::Close(code.into(), reason)))
        }
        CLOSE => Err(RecordError::ShortClose(body.len())),
        other => Err(RecordError::UnknownType(other)),
    }
}

/// The reading half of a TCP connection.
pub(crate) struct TcpReader<S> {
    read: ReadHalf<S>,
    buf: BytesMut,
    /// When the last bytes arrived.
    heard: tokio::time::Instant,
    /// Set when the connection is closed (from any handle).
    closing: watch::Receiver<CloseWith>,
}

impl<S: AsyncRead> TcpReader<S> {
    /// The next record; `Ok(None)` at the end of the stream, `TimedOut`
    /// after [`IDLE_TIMEOUT`] of silence, `ConnectionAborted` once the
    /// connection was closed through a handle. Cancel-safe: what was read
    /// stays buffered.
    pub(crate) async fn next(&mut self) -> io::Result<Option<Record>> {
        loop {
            if let Some(record) =
                decode(&mut self.buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                return Ok(Some(record));
            }
            self.buf.reserve(HEADER + MAX_BODY);
            let read = self.read.read_buf(&mut self.buf);
            let read = tokio::time::timeout_at(self.heard + IDLE_TIMEOUT, read);
            let read = tokio::select! {
                read = read => read,
                _ = self.closing.wait_for(Option::is_some) => {
                    return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed"));
                }
            };
            match read {
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(_)) => self.heard = tokio::time::Instant::now(),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("nothing heard for {} s", IDLE_TIMEOUT.as_secs()),
                    ));
                }
            }
        }
    }
}

/// What the writer is told to close with.
type CloseWith = Option<(CloseCode, Vec<u8>)>;

/// What goes to the writer: an encoded record, or a relay datagram (its
/// header is written in front of it there, without a copy of its own).
enum Out {
    Record(Bytes),
    Datagram(Bytes),
}

/// The sending side of a TCP connection, cloneable: records go to a writer
/// task in order.
#[derive(Clone)]
pub(crate) struct TcpHandle {
    records: mpsc::Sender<Out>,
    close: Arc<watch::Sender<CloseWith>>,
}

impl TcpHandle {
    /// Queues control stream bytes, waiting while the writer is behind
    /// (but not once the connection is closed: a peer that stops reading
    /// cannot hold its session).
    pub(crate) async fn write_control(&self, bytes: &[u8]) -> Result<(), String> {
        for record in encode_control(bytes) {
            tokio::select! {
                sent = self.records.send(Out::Record(record)) => {
                    sent.map_err(|_| "connection closed".to_owned())?;
                }
                () = self.closed() => return Err("connection closed".into()),
            }
        }
        Ok(())
    }

    /// Queues a relay datagram; dropped when the writer is behind.
    pub(crate) fn send_datagram(&self, datagram: Bytes) -> Result<(), String> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(format!("a datagram of {} bytes", datagram.len()));
        }
        match self.records.try_send(Out::Datagram(datagram)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err("send queue full".into()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err("connection closed".into()),
        }
    }

    /// Sends what is queued, then a close record, and ends the connection.
    pub(crate) fn close(&self, code: CloseCode, reason: &[u8]) {
        self.close.send_if_modified(|c| {
            let first = c.is_none();
            if first {
                *c = Some((code, reason.to_vec()));
            }
            first
        });
    }

    /// Resolves once [`close`](Self::close) was called (by anyone).
    pub(crate) async fn closed(&self) {
        let mut rx = self.close.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }
}

/// Splits a TLS stream into its reader and handle, and spawns the writer
/// task (it ends after a close, or when every handle is gone).
pub(crate) fn start<S>(stream: S) -> (TcpReader<S>, TcpHandle)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel(QUEUE);
    let (close_tx, close_rx) = watch::channel(None);
    let closing = close_rx.clone();
    tokio::spawn(write_loop(write, rx, close_rx));
    let reader = TcpReader {
        read,
        buf: BytesMut::new(),
        heard: tokio::time::Instant::now(),
        closing,
    };
    let handle = TcpHandle {
        records: tx,
        close: Arc::new(close_tx),
    };
    (reader, handle)
}

/// Appends what `out` puts on the wire.
fn append(batch: &mut Vec<u8>, out: Out) {
    match out {
        Out::Record(record) => batch.extend_from_slice(&record),
        Out::Datagram(datagram) => {
            batch.push(DATAGRAM);
            batch.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
            batch.extend_from_slice(&datagram);
        }
    }
}

async fn write_loop<S: AsyncWrite>(
    mut write: WriteHalf<S>,
    mut records: mpsc::Receiver<Out>,
    mut close: watch::Receiver<CloseWith>,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let first = tokio::time::Instant::now() + KEEP_ALIVE;
    let mut keep_alive = tokio::time::interval_at(first, KEEP_ALIVE);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = keep_alive.tick() => {
                if write.write_all(&encode(CONTROL, &[])).await.is_err() {
                    return;
                }
            }
            record = records.recv() => {
                let Some(record) = record else { break };
                append(&mut batch, record);
                // What else is queued goes out in the same TLS write.
                while batch.len() < WRITE_BATCH {
                    let Ok(more) = records.try_recv() else { break };
                    append(&mut batch, more);
                }
                // A peer that stops reading must not keep a close from
                // taking effect: once closed, a write gets a keep-alive
                // interval to finish, then the connection is dropped.
                tokio::select! {
                    written = write.write_all(&batch) => {
                        if written.is_err() {
                            return;
                        }
                    }
                    () = async {
                        let _ = close.wait_for(Option::is_some).await;
                        tokio::time::sleep(KEEP_ALIVE).await;
                    } => return,
                }
                batch.clear();
            }
            () = async {
                let _ = close.wait_for(Option::is_some).await;
            } => break,
        }
    }
    // Closing: what was queued first, then the close record, for as long
    // as the peer takes it (a keep-alive interval at most).
    while let Ok(more) = records.try_recv() {
        append(&mut batch, more);
    }
    let with = close.borrow().clone();
    if let Some((code, reason)) = with {
        batch.extend_from_slice(&encode_close(code, &reason));
    }
    let _ = tokio::time::timeout(KEEP_ALIVE, async {
        if write.write_all(&batch).await.is_ok() {
            let _ = write.shutdown().await;
        }
    })
    .await;
}

/// A site's connection to the rendezvous, as the code that relays and
/// closes sees it: QUIC, or TLS over TCP.
#[derive(Clone)]
pub(crate) enum Carrier {
    Quic(quinn::Connection),
    Tcp(TcpHandle),
}

impl Carrier {
    /// Sends one relay datagram (never waits; may be dropped).
    pub(crate) fn send_datagram(&self, datagram: Bytes) -> Result<(), String> {
        match self {
            Carrier::Quic(conn) => conn.send_datagram(datagram).map_err(|e| e.to_string()),
            Carrier::Tcp(tcp) => tcp.send_datagram(datagram),
        }
    }

    /// The largest datagram that can be sent now.
    pub(crate) fn max_datagram_size(&self) -> Option<usize> {
        match self {
            Carrier::Quic(conn) => conn.max_datagram_size(),
            Carrier::Tcp(_) => Some(MAX_DATAGRAM),
        }
    }

    /// Closes the connection with `code` and `reason`.
    pub(crate) fn close(&self, code: CloseCode, reason: &[u8]) {
        match self {
            Carrier::Quic(conn) => conn.close(code.varint(), reason),
            Carrier::Tcp(tcp) => tcp.close(code, reason),
        }
    }

    /// `"quic"` or `"tcp"`, for status and logs.
    pub(crate) fn transport(&self) -> &'static str {
        match self {
            Carrier::Quic(_) => "quic",
            Carrier::Tcp(_) => "tcp",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_split_anywhere() {
        let mut wire = Vec::new();
        let control: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        for r in encode_control(&control) {
            wire.extend_from_slice(&r);
        }
        wire.extend_from_slice(&encode(DATAGRAM, b"ciphertext"));
        wire.extend_from_slice(&encode_close(CloseCode::Replaced, b"bye"));
        // Fed one byte at a time, the same records come out.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.extend_from_slice(&[b]);
            while let Some(r) = decode(&mut buf).expect("valid records") {
                got.push(r);
            }
        }
        let mut joined = Vec::new();
        for r in &got[..2] {
            let Record::Control(bytes) = r else {
                panic!("{r:?}")
            };
            joined.extend_from_slice(bytes);
        }
        assert_eq!(joined, control);
        assert_eq!(got[2], Record::Datagram(Bytes::from_static(b"ciphertext")));
        assert_eq!(
            got[3],
            Record::Close(CloseCode::Replaced.as_u32().into(), "bye".into())
        );
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn bad_records_are_errors() {
        let mut buf = BytesMut::from(&[9u8, 0, 1, 0][..]);
        assert!(matches!(decode(&mut buf), Err(RecordError::UnknownType(9))));
        let mut buf = BytesMut::from(&[CLOSE, 0, 2, 0, 0][..]);
        assert!(matches!(decode(&mut buf), Err(RecordError::ShortClose(2))));
        let mut buf = BytesMut::from(&[DATAGRAM, 0, 5, 1][..]);
        assert!(matches!(decode(&mut buf), Ok(None)), "incomplete");
    }

    #[tokio::test]
    async fn a_close_flushes_what_was_queued_first() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (_reader_a, handle) = start(a);
        let (mut reader_b, _handle_b) = start(b);
        handle.write_control(b"hello").await.expect("queued");
        handle
            .send_datagram(Bytes::from_static(b"data"))
            .expect("queued");
        handle.close(CloseCode::Normal, b"done");
        handle.closed().await;
        assert_eq!(
            reader_b.next().await.expect("read"),
            Some(Record::Control(Bytes::from_static(b"hello")))
        );
        assert_eq!(
            reader_b.next().await.expect("read"),
            Some(Record::Datagram(Bytes::from_static(b"data")))
        );
        assert_eq!(
            reader_b.next().await.expect("read"),
            Some(Record::Close(
                CloseCode::Normal.as_u32().into(),
                "done".into()
            ))
        );
        assert_eq!(reader_b.next().await.expect("read"), None);
    }

    #[tokio::test]
    async fn a_close_takes_effect_when_the_peer_stops_reading() {
        // The other end never reads: the writer blocks, the queue fills,
        // and a control write waits; a close must still end all of it.
        let (a, _never_read) = tokio::io::duplex(64);
        let (mut reader, handle) = start(a);
        let blocked = handle.clone();
        let writer =
            tokio::spawn(async move { while blocked.write_control(&[0u8; 4096]).await.is_ok() {} });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "the writes should be stuck");
        handle.close(CloseCode::Overloaded, b"overloaded");
        tokio::time::timeout(std::time::Duration::from_secs(1), writer)
            .await
            .expect("the waiting write returns after the close")
            .expect("writer task");
        let read = reader.next().await;
        assert!(
            matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionAborted),
            "{read:?}"
        );
    }
}
