//! The Unix-socket server that the control socket (`causeway status`) and
//! the WireGuard UAPI socket (`wg show`) share: each is a handler on it.
//!
//! - **Binding**: the directory is created 0700 when missing (and never
//!   changed otherwise: `/var/run/wireguard` is shared with other
//!   implementations). A socket left by a crashed run (nobody answers on
//!   it) is replaced; a socket a live process answers on is an error
//!   ([`io::ErrorKind::AddrInUse`]), and so is a path that is not a socket
//!   ([`io::ErrorKind::AlreadyExists`], never removed). The new socket is
//!   made 0600.
//! - **Who may connect**: root and the daemon's own user (the socket
//!   file's owner), checked with `SO_PEERCRED` on every connection; anyone
//!   else is closed unanswered. This also covers the instant between
//!   `bind` and `chmod`, and a socket whose mode someone widened.
//! - **Limits**: at most [`Limits::max_connections`] connections are
//!   served at once (the rest wait in the listen backlog), and each is
//!   closed [`Limits::connection_timeout`] after it was accepted, finished
//!   or not.
//! - **Accept errors** (out of descriptors and the like) are logged and
//!   retried after a pause that doubles up to [`MAX_BACKOFF`], not in a
//!   busy loop.
//! - **Dropping** the [`UnixServer`] stops it, ends its connections and
//!   removes the socket file, unless another process replaced it since.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{Instrument, debug, info, warn};

/// First pause after a failed `accept`.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause between failed `accept`s.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How much one server takes on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub(crate) max_connections: usize,
    /// A connection is closed this long after it was accepted.
    pub(crate) connection_timeout: Duration,
}

/// A listening socket and its connections. Dropping it stops serving and
/// removes the socket file (unless another process replaced it since).
pub(crate) struct UnixServer {
    path: PathBuf,
    /// (device, inode) of the socket file this server created.
    inode: (u64, u64),
    task: JoinHandle<()>,
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.task.abort();
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl UnixServer {
    /// Binds `path` (see the module documentation for the rules) and runs
    /// `handler` on each admitted connection. `what` names the socket in
    /// logs ("control", "uapi").
    pub(crate) async fn serve<H, F>(
        path: &Path,
        what: &'static str,
        limits: Limits,
        handler: H,
    ) -> io::Result<UnixServer>
    where
        H: Fn(UnixStream) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = bind(path, what).await?;
        let meta = std::fs::symlink_metadata(path)?;
        // The socket file belongs to the user the daemon runs as.
        let owner = meta.uid();
        let span = tracing::info_span!("socket", what, path = %path.display());
        let task = tokio::spawn(accept_loop(listener, owner, limits, handler).instrument(span));
        Ok(UnixServer {
            path: path.to_owned(),
            inode: (meta.dev(), meta.ino()),
            task,
        })
    }
}

/// Binds `path`: creates the directory if needed, refuses a socket a live
/// process answers on and anything that is not a socket, replaces a stale
/// socket, and makes the new one 0600. Errors name the path.
async fn bind(path: &Path, what: &str) -> io::Result<UnixListener> {
    let with_path = |e: io::Error, doing: &str| {
        io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
    };
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty() && !dir.exists());
    if let Some(dir) = dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| with_path(e, "creating the directory of"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; remove it or choose another path",
                    path.display()
                ),
            ));
        }
        Ok(_) => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is answered by a running process (another causeway on this interface?)",
                        path.display()
                    ),
                ));
            }
            // Nobody listens: a crashed run's socket.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), what, "replacing the stale socket of a previous run");
                std::fs::remove_file(path)
                    .map_err(|e| with_path(e, "removing the stale socket"))?;
            }
            Err(e) => return Err(with_path(e, "checking whether a process answers on")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e, "inspecting")),
    }
    let listener = UnixListener::bind(path).map_err(|e| with_path(e, "binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| with_path(e, "restricting"))?;
    Ok(listener)
}

/// Whether a client running as `uid` may use a socket owned by `owner`.
fn admitted(uid: u32, owner: u32) -> bool {
    uid == 0 || uid == owner
}

/// The pause after a failed `accept` that followed one of `previous`.
fn next_backoff(previous: Duration) -> Duration {
    (previous * 2).clamp(MIN_BACKOFF, MAX_BACKOFF)
}

async fn accept_loop<H, F>(listener: UnixListener, owner: u32, limits: Limits, handler: H)
where
    H: Fn(UnixStream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Connections live in the set, so that aborting this task ends them.
    let mut connections = JoinSet::new();
    let mut backoff = Duration::ZERO;
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    backoff = next_backoff(backoff);
                    warn!("accept: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        backoff = Duration::ZERO;
        match stream.peer_cred() {
            Ok(cred) if admitted(cred.uid(), owner) => {}
            Ok(cred) => {
                warn!(
                    uid = cred.uid(),
                    "closed a connection from a user that is neither root nor the daemon's"
                );
                continue;
            }
            Err(e) => {
                warn!("cannot tell who connected ({e}); closing");
                continue;
            }
        }
        let served = handler(stream);
        let timeout = limits.connection_timeout;
        connections.spawn(
            async move {
                if tokio::time::timeout(timeout, served).await.is_err() {
                    debug!("closed a connection still open after {timeout:?}");
                }
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        max_connections: 4,
        connection_timeout: Duration::from_secs(10),
    };

    /// Answers "hello\n" and closes.
    async fn hello(path: &Path) -> io::Result<UnixServer> {
        UnixServer::serve(path, "test", LIMITS, |mut conn: UnixStream| async move {
            let _ = conn.write_all(b"hello\n").await;
        })
        .await
    }

    async fn read_all(path: &Path) -> String {
        let mut conn = UnixStream::connect(path).await.expect("connect");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut out))
            .await
            .expect("answer in time")
            .expect("read");
        out
    }

    #[test]
    fn root_and_the_owner_are_admitted_nobody_else() {
        assert!(admitted(0, 1000));
        assert!(admitted(1000, 1000));
        assert!(admitted(0, 0));
        assert!(!admitted(1001, 1000));
        assert!(!admitted(65534, 0));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..10 {
            b = next_backoff(b);
            seen.push(b);
        }
        assert_eq!(seen[0], MIN_BACKOFF);
        assert_eq!(seen[1], MIN_BACKOFF * 2);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*seen.last().expect("last"), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn stale_live_and_foreign_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run").join("cw0.sock");

        let served = hello(&path).await.expect("serve");
        let meta = std::fs::metadata(dir.path().join("run")).expect("dir");
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "new directory");
        let meta = std::fs::symlink_metadata(&path).expect("socket");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(read_all(&path).await, "hello\n");

        // A live socket is not taken over, and keeps answering.
        let err = hello(&path).await.err().expect("second serve must fail");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(read_all(&path).await, "hello\n");

        // Dropping removes the file.
        drop(served);
        assert!(!path.exists());

        // A stale socket (its process died) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        assert!(path.exists());
        let served = hello(&path).await.expect("replace stale socket");
        assert_eq!(read_all(&path).await, "hello\n");

        // Someone else's socket at the path is not removed on drop.
        std::fs::remove_file(&path).expect("rm");
        let other = std::os::unix::net::UnixListener::bind(&path).expect("other");
        drop(served);
        assert!(path.exists(), "another process' socket was removed");
        drop(other);

        // A file that is not a socket is never removed.
        std::fs::remove_file(&path).expect("rm");
        std::fs::write(&path, "not a socket").expect("write");
        let err = hello(&path)
            .await
            .err()
            .expect("must refuse a regular file");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).expect("still there"),
            "not a socket"
        );
    }

    /// Whether `conn` is answered within `wait`.
    async fn answered(conn: &mut UnixStream, wait: Duration) -> bool {
        let mut buf = [0u8; 7];
        matches!(
            tokio::time::timeout(wait, conn.read_exact(&mut buf)).await,
            Ok(Ok(_))
        )
    }

    /// Connections beyond the bound wait (unanswered) until one ends.
    #[tokio::test]
    async fn concurrent_connections_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bounded.sock");
        let limits = Limits {
            max_connections: 2,
            connection_timeout: Duration::from_secs(30),
        };
        let release = Arc::new(Semaphore::new(0));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let handler = {
            let (release, running, most) = (release.clone(), running.clone(), most.clone());
            move |mut conn: UnixStream| {
                let (release, running, most) = (release.clone(), running.clone(), most.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    let _ = conn.write_all(b"served\n").await;
                    if let Ok(permit) = release.acquire().await {
                        permit.forget();
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                }
            }
        };
        let _served = UnixServer::serve(&path, "test", limits, handler)
            .await
            .expect("serve");

        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(UnixStream::connect(&path).await.expect("connect"));
        }
        assert!(answered(&mut clients[0], Duration::from_secs(5)).await);
        assert!(answered(&mut clients[1], Duration::from_secs(5)).await);
        // The third is connected (backlog) but not served while two are.
        assert!(!answered(&mut clients[2], Duration::from_millis(200)).await);
        assert_eq!(most.load(Ordering::SeqCst), 2);

        // One ends: the third is served.
        release.add_permits(1);
        assert!(answered(&mut clients[2], Duration::from_secs(5)).await);
        assert_eq!(most.load(Ordering::SeqCst), 2, "never more than the bound");
        release.add_permits(2);
    }

    /// A connection that outlives its timeout is closed.
    #[tokio::test]
    async fn connections_time_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("slow.sock");
        let limits = Limits {
            max_connections: 1,
            connection_timeout: Duration::from_millis(50),
        };
        let _served = UnixServer::serve(&path, "test", limits, |conn: UnixStream| async move {
            // Holds the connection forever.
            let _conn = conn;
            std::future::pending::<()>().await;
        })
        .await
        .expect("serve");
        for _ in 0..2 {
            // EOF after the timeout; the slot is freed for the next one.
            let mut conn = UnixStream::connect(&path).await.expect("connect");
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut out))
                .await
                .expect("closed by the server")
                .expect("read");
            assert!(out.is_empty());
        }
    }

    /// A user that is neither root nor the socket's owner is closed
    /// unanswered, even when the socket's mode lets it connect.
    #[tokio::test]
    async fn other_users_are_closed_unanswered() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to connect as another user");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let path = dir.path().join("creds.sock");
        let handled = Arc::new(AtomicUsize::new(0));
        let served = {
            let handled = handled.clone();
            UnixServer::serve(&path, "test", LIMITS, move |mut conn: UnixStream| {
                handled.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = conn.write_all(b"secret\n").await;
                }
            })
            .await
            .expect("serve")
        };
        // As if someone widened the mode, or connected between bind and chmod.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");

        // Linux credentials are per thread; the libc wrapper changes every
        // thread of the process, the raw system call only this one, which
        // is thrown away afterwards.
        let client = {
            let path = path.clone();
            std::thread::spawn(move || -> io::Result<Vec<u8>> {
                // SAFETY: changes only this thread's credentials.
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                let mut conn = std::os::unix::net::UnixStream::connect(&path)?;
                conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut conn, &mut out)?;
                Ok(out)
            })
        };
        let answer = tokio::task::spawn_blocking(move || client.join())
            .await
            .expect("join")
            .expect("client thread")
            .expect("nobody connects and reads");
        assert!(answer.is_empty(), "answered {answer:?}");
        assert_eq!(handled.load(Ordering::SeqCst), 0);

        // Root still gets its answer.
        assert_eq!(read_all(&path).await, "secret\n");
        assert_eq!(handled.load(Ordering::SeqCst), 1);
        drop(served);
    }
}
