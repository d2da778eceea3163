//! The node agent's end: one long-poll watch per gateway address.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::server::LONG_POLL;
use super::wire::{self, Announcement, ClusterSecret, NONCE_LEN, Session, WireError};

/// How long connecting to a gateway may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a reply may take: the long poll plus slack. A gateway silent
/// for longer is taken as gone.
const REPLY_TIMEOUT: Duration = Duration::from_secs(LONG_POLL.as_secs() + 5);
/// The first and the longest wait before reconnecting.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// What one gateway said last, or that it stopped answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A fresh announcement from the gateway at this address.
    Announcement(SocketAddr, Announcement),
    /// The connection to this address failed or closed; why.
    Lost(SocketAddr, String),
}

/// Why a watch ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The gateway sent something that does not parse or authenticate
    /// (another cluster secret, or not a Causeway gateway).
    #[error("{0}")]
    Wire(#[from] WireError),
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The gateway did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Watches the gateway at `addr` until `tx` is closed: connects, follows
/// its announcements (each one sent on `tx` as it arrives), and reconnects
/// with backoff when the connection fails.
pub async fn watch(addr: SocketAddr, secret: ClusterSecret, tx: mpsc::Sender<Heard>) {
    let mut backoff = BACKOFF.0;
    loop {
        let result = session(addr, &secret, &tx, &mut backoff).await;
        let why = match result {
            Ok(()) => return, // the receiver is gone
            Err(e) => e.to_string(),
        };
        debug!(gateway = %addr, "cluster watch: {why}");
        if tx.send(Heard::Lost(addr, why)).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

async fn session(
    addr: SocketAddr,
    secret: &ClusterSecret,
    tx: &mpsc::Sender<Heard>,
    backoff: &mut Duration,
) -> Result<(), WatchError> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| WatchError::Timeout(CONNECT_TIMEOUT))??;
    let _ = stream.set_nodelay(true);
    let hello = read_frame(&mut stream, CONNECT_TIMEOUT).await?;
    let server_nonce = wire::parse_hello(&hello)?;
    let client_nonce: [u8; NONCE_LEN] = rand::random();
    let mut session = Session::client(secret, &server_nonce, &client_nonce);
    let mut version = 0;
    write_frame(
        &mut stream,
        &wire::first_watch(&client_nonce, &mut session, version),
    )
    .await?;
    let mut first = true;
    loop {
        let sealed = read_frame(&mut stream, REPLY_TIMEOUT).await?;
        let (new, announcement) = wire::open_reply(&mut session, &sealed)?;
        if first {
            info!(gateway = %addr, site = announcement.site, active = announcement.active, "cluster: following gateway");
            first = false;
            *backoff = BACKOFF.0;
        }
        if new != version {
            version = new;
            if tx
                .send(Heard::Announcement(addr, announcement))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        write_frame(&mut stream, &wire::watch(&mut session, version)).await?;
    }
}

async fn read_frame(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, WatchError> {
    tokio::time::timeout(timeout, super::read_frame(stream))
        .await
        .map_err(|_| WatchError::Timeout(timeout))?
}

async fn write_frame(stream: &mut TcpStream, payload: &[u8]) -> Result<(), WatchError> {
    let framed = wire::frame(payload)?;
    tokio::time::timeout(CONNECT_TIMEOUT, stream.write_all(&framed))
        .await
        .map_err(|_| WatchError::Timeout(CONNECT_TIMEOUT))??;
    Ok(())
}
