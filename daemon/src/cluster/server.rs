//! The gateway's end: the [`Announcer`] the daemon updates, and the TCP
//! server that answers the node agents' long polls.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use super::wire::{self, Announcement, ClusterSecret, NONCE_LEN, Session, WireError};

/// How long the gateway holds a watch whose version is current before it
/// answers anyway (so that a node notices a dead connection).
pub const LONG_POLL: Duration = Duration::from_secs(10);
/// How long a node may take to send its next watch.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new connection may take to send its first (authenticated)
/// frame: a stranger cannot hold a connection slot for longer.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write to a node may take before the connection is dropped
/// (a slow node never holds the gateway up).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most node connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 4096;

/// The announcement and its version (bumped on every change).
#[derive(Debug, Clone)]
struct Published {
    version: u64,
    announcement: Announcement,
}

/// What the gateway announces to the node agents. Cheap to clone; every
/// clone updates the same announcement.
#[derive(Clone)]
pub struct Announcer {
    tx: Arc<watch::Sender<Published>>,
}

impl Announcer {
    /// An announcer for `site`, not active (term 0) and with no views yet.
    pub fn new(announcement: Announcement) -> Self {
        let (tx, _) = watch::channel(Published {
            version: 1,
            announcement,
        });
        Self { tx: Arc::new(tx) }
    }

    fn update(&self, change: impl FnOnce(&mut Announcement)) {
        self.tx.send_if_modified(|p| {
            let before = p.announcement.clone();
            change(&mut p.announcement);
            let changed = before != p.announcement;
            if changed {
                p.version += 1;
            }
            changed
        });
    }

    /// Sets the peer view CIDRs nodes route to the gateway.
    pub fn set_views(&self, views: Vec<IpNet>) {
        self.update(|a| a.views = views);
    }

    /// Sets whether this gateway is the active one, and its term.
    pub fn set_active(&self, active: bool, term: u64) {
        self.update(|a| {
            a.active = active;
            a.term = term;
        });
    }

    /// What is announced now.
    pub fn current(&self) -> Announcement {
        self.tx.borrow().announcement.clone()
    }
}

/// Counters of the cluster server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections closed at accept because [`MAX_CONNECTIONS`] were open.
    pub refused: AtomicU64,
    /// Frames that did not parse or authenticate (the connection is closed).
    pub bad_frames: AtomicU64,
    /// Announcements sent.
    pub replies: AtomicU64,
}

/// Serves node agents on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    secret: ClusterSecret,
    announcer: Announcer,
    stats: Arc<ServerStats>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let secret = Arc::new(secret);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (stream, from) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("cluster: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let secret = Arc::clone(&secret);
        let rx = announcer.tx.subscribe();
        let stats = Arc::clone(&stats);
        tasks.spawn(async move {
            if let Err(e) = connection(stream, &secret, rx, &stats).await {
                if matches!(e, ConnError::Wire(_)) {
                    stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    info!(node = %from, "cluster: closed a connection: {e}");
                } else {
                    debug!(node = %from, "cluster: connection ended: {e}");
                }
            }
            drop(slot);
        });
    }
    tasks.abort_all();
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
}

async fn connection(
    mut stream: TcpStream,
    secret: &ClusterSecret,
    mut rx: watch::Receiver<Published>,
    stats: &ServerStats,
) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let server_nonce: [u8; NONCE_LEN] = rand::random();
    write_frame(&mut stream, &wire::hello(&server_nonce)).await?;
    let first = tokio::time::timeout(
        FIRST_FRAME_TIMEOUT,
        super::read_frame::<_, ConnError>(&mut stream),
    )
    .await
    .map_err(|_| ConnError::Timeout)??;
    let (client_nonce, sealed) = wire::split_first_watch(&first)?;
    let mut session = Session::server(secret, &server_nonce, &client_nonce);
    let mut known = wire::open_watch(&mut session, sealed)?;
    loop {
        let deadline = tokio::time::sleep(LONG_POLL);
        tokio::pin!(deadline);
        loop {
            if rx.borrow_and_update().version != known {
                break;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return Ok(()) },
                _ = &mut deadline => break,
            }
        }
        let sealed = {
            let published = rx.borrow_and_update();
            wire::reply(&mut session, published.version, &published.announcement)
        };
        write_frame(&mut stream, &sealed).await?;
        stats.replies.fetch_add(1, Ordering::Relaxed);
        let next = read_frame(&mut stream).await?;
        known = wire::open_watch(&mut session, &next)?;
    }
}

async fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>, ConnError> {
    tokio::time::timeout(READ_TIMEOUT, super::read_frame(stream))
        .await
        .map_err(|_| ConnError::Timeout)?
}

async fn write_frame(stream: &mut TcpStream, payload: &[u8]) -> Result<(), ConnError> {
    let framed = wire::frame(payload)?;
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&framed))
        .await
        .map_err(|_| ConnError::Timeout)??;
    Ok(())
}
