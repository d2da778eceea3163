//! The WireGuard cross-platform userspace API ("UAPI"), so that `wg show`,
//! `wg show <interface> dump` and `wg showconf` from wireguard-tools work on
//! a causeway interface as they do on a kernel or wireguard-go one.
//!
//! The socket is `/var/run/wireguard/<interface>.sock`, where `wg` looks
//! for userspace implementations. The directory is shared with other
//! implementations (wireguard-go, boringtun-cli): it is created 0700 when
//! missing and never changed otherwise. The socket is 0600 and a connection
//! from any user other than root or the daemon's own is closed unanswered
//! (the rules of [`super::unix`], which the control socket shares).
//!
//! # What is served
//! The protocol is line based (`key=value\n`, an empty line ends a request
//! and a response). Several requests may follow each other on one
//! connection, as in wireguard-go.
//!
//! `get=1` answers with the device and every configured peer:
//! - `private_key`: the site's key, hex. `wg show` prints it as `(hidden)`
//!   and derives the interface's public key from it (the protocol has no
//!   other way to tell it), `wg showconf` prints it. wireguard-go returns
//!   it too; the socket is root only, and the key file is readable by root
//!   anyway.
//! - `listen_port`; no `fwmark` (the daemon sets none).
//! - per peer: `public_key`, `protocol_version=1`, `endpoint` (where its
//!   packets go now; absent until known), `last_handshake_time_sec` /
//!   `_nsec` (wall clock: now minus the age of the last completed
//!   handshake; 0 when there was none), `tx_bytes` / `rx_bytes`,
//!   `persistent_keepalive_interval` and one `allowed_ip` per **view CIDR**.
//!   The counters are inner (plaintext) bytes, the same numbers
//!   `causeway status` shows (kernel WireGuard counts the encrypted
//!   datagrams, about 32 bytes more per packet). The allowed IPs are the
//!   views because they are what the local routing table sends into the
//!   interface and the source addresses packets from the peer carry once
//!   they come out of it; `causeway status` shows the real CIDR behind
//!   each view.
//!
//! `set=1` is refused with EPERM, after the whole request has been read, so
//! `wg set`, `wg setconf`, `wg syncconf` and `wg addconf` fail at once with
//! "Operation not permitted". Peers, keys, ports and
//! allowed IPs are managed by the config file, which stays the single source
//! of truth across restarts and reloads; a change made through `wg` would
//! silently disagree with it. The refusal is logged with what was asked.
//!
//! Anything else (an unknown operation, a `get=1` not followed by an empty
//! line, a line that is not `key=value`, a line longer than
//! [`MAX_LINE`] bytes or a request of more than [`MAX_REQUEST`] bytes) is
//! answered with EINVAL and the connection is closed.
//!
//! Errors go on the wire negated, `errno=-1` and `errno=-22`, as
//! wireguard-go sends them: `wg` negates the number back before printing
//! it (`errno=1` would make it print "Unknown error -1").
//!
//! A client that stays silent for [`READ_TIMEOUT`] is disconnected. The
//! socket (binding, who may connect, how many at once, for how long) is
//! [`super::unix`]'s, with [`LIMITS`].

use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use super::snapshot::{LiveSite, Snapshot};
use super::unix::{Limits, UnixServer};

/// Longest line accepted (an endpoint host name may be 4096 bytes long in
/// `wg`'s own limits).
pub(crate) const MAX_LINE: usize = 8192;
/// Largest `set=1` request read before it is refused.
pub(crate) const MAX_REQUEST: usize = 4 << 20;
/// Distinct keys of a `set=1` request kept for the log line (`wg` knows
/// 13); the rest are only counted. Keeps the de-duplication linear in the
/// request's size and the log line short.
const MAX_LOGGED_KEYS: usize = 32;
/// A client silent for this long is disconnected.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once, and how long one may stay open.
pub(crate) const LIMITS: Limits = Limits {
    max_connections: 8,
    connection_timeout: Duration::from_secs(60),
};

/// Length of `get=1` and `set=1`.
const OPERATION: &str = "get=1";
/// Errors, sent negated (see the module documentation).
const EPERM: i32 = 1;
const EINVAL: i32 = 22;

/// The `get=1` answer for `snapshot` and the site's `private_key`, up to
/// (not including) the `errno` line.
pub(crate) fn encode(snapshot: &Snapshot, private_key: &[u8; 32]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(256 + 256 * snapshot.peers.len()));
    // Writing to a String cannot fail.
    let _ = writeln!(out, "private_key={}", Hex(private_key));
    let _ = writeln!(out, "listen_port={}", snapshot.site.listen_port);
    for p in &snapshot.peers {
        let _ = writeln!(out, "public_key={}", Hex(p.public_key.as_bytes()));
        let _ = writeln!(out, "protocol_version=1");
        if let Some(endpoint) = p.endpoint {
            // `[v6%scope]:port` or `v4:port`, as `wg` parses them.
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        let since_epoch = p
            .last_handshake
            .and_then(|h| h.at.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", since_epoch.as_secs());
        let _ = writeln!(
            out,
            "last_handshake_time_nsec={}",
            since_epoch.subsec_nanos()
        );
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive.unwrap_or(0)
        );
        for v in &p.views {
            let _ = writeln!(
                out,
                "allowed_ip={}/{}",
                v.view.network(),
                v.view.prefix_len()
            );
        }
    }
    out
}

/// Lower-case hex of a key.
struct Hex<'a>(&'a [u8; 32]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A request, once read in full.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Get,
    /// The keys that were given (`public_key`, `allowed_ip`, …), for the log.
    Set {
        keys: Vec<String>,
        /// Keys (distinct or not) left out of `keys` past [`MAX_LOGGED_KEYS`].
        more: usize,
    },
}

/// Why a connection ends.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The client closed it between requests.
    Closed,
    /// The client broke the protocol: answer EINVAL and close.
    Invalid(&'static str),
    /// The client went away mid-request, or was too slow.
    Gone,
}

/// Reads one line, without its `\n`, refusing lines longer than `max`
/// bytes and anything that is not UTF-8. `Ok(None)`: EOF before any byte.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
    timeout: Duration,
) -> Result<Option<()>, End> {
    line.clear();
    loop {
        let chunk = match tokio::time::timeout(timeout, reader.fill_buf()).await {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(_)) | Err(_) => return Err(End::Gone),
        };
        if chunk.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(End::Gone)
            };
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if line.len() + take > max + 1 {
            return Err(End::Invalid("line too long"));
        }
        line.extend_from_slice(&chunk[..take]);
        reader.consume(take);
        if done {
            line.pop();
            return if std::str::from_utf8(line).is_ok() {
                Ok(Some(()))
            } else {
                Err(End::Invalid("not UTF-8"))
            };
        }
    }
}

/// Reads the next request. `Err(End::Closed)` when the client closed the
/// connection cleanly between requests.
async fn read_request<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    timeout: Duration,
) -> Result<Request, End> {
    let mut line = Vec::with_capacity(128);
    // The operation line is `get=1` or `set=1`: anything longer is refused
    // as soon as it is seen, without waiting for a newline.
    if read_line(reader, &mut line, OPERATION.len(), timeout)
        .await?
        .is_none()
    {
        return Err(End::Closed);
    }
    match line.as_slice() {
        b"get=1" => match read_line(reader, &mut line, MAX_LINE, timeout).await? {
            Some(()) if line.is_empty() => Ok(Request::Get),
            Some(()) => Err(End::Invalid("get=1 must be followed by an empty line")),
            None => Err(End::Gone),
        },
        b"set=1" => {
            let mut keys: Vec<String> = Vec::new();
            let mut more = 0;
            let mut total = 0;
            loop {
                if read_line(reader, &mut line, MAX_LINE, timeout)
                    .await?
                    .is_none()
                {
                    return Err(End::Gone);
                }
                if line.is_empty() {
                    return Ok(Request::Set { keys, more });
                }
                total += line.len() + 1;
                if total > MAX_REQUEST {
                    return Err(End::Invalid("set request too large"));
                }
                let Some(eq) = line.iter().position(|&b| b == b'=') else {
                    return Err(End::Invalid("line is not key=value"));
                };
                let key = &line[..eq];
                if key.is_empty() || !key.iter().all(|b| b.is_ascii_lowercase() || *b == b'_') {
                    return Err(End::Invalid("bad key"));
                }
                // At most MAX_LOGGED_KEYS comparisons per line: linear.
                if keys.iter().any(|k| k.as_bytes() == key) {
                    continue;
                }
                if keys.len() < MAX_LOGGED_KEYS {
                    // `read_line` checked UTF-8, and the key is ASCII.
                    keys.push(String::from_utf8_lossy(key).into_owned());
                } else {
                    more += 1;
                }
            }
        }
        _ => Err(End::Invalid("unknown operation")),
    }
}

/// Fuzzing entry point, not an API: reads requests from `input` the way a
/// connection is served, and returns each outcome (`get`, `set <keys>`,
/// then one of `closed`, `gone`, `invalid <why>`) with the bytes it took.
#[doc(hidden)]
pub fn fuzz_requests(input: &[u8]) -> Vec<(String, std::ops::Range<usize>)> {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return Vec::new();
    };
    runtime.block_on(async {
        let mut reader = input;
        let mut out = Vec::new();
        loop {
            let start = input.len() - reader.len();
            let result = read_request(&mut reader, READ_TIMEOUT).await;
            let span = start..input.len() - reader.len();
            let (what, end) = match result {
                Ok(Request::Get) => ("get".to_owned(), false),
                Ok(Request::Set { keys, .. }) => (format!("set {}", keys.join(",")), false),
                Err(End::Closed) => ("closed".to_owned(), true),
                Err(End::Gone) => ("gone".to_owned(), true),
                Err(End::Invalid(why)) => (format!("invalid {why}"), true),
            };
            out.push((what, span));
            if end {
                return out;
            }
        }
    })
}

/// Serves one connection until it closes or breaks the protocol.
/// A request must arrive within `timeout` of the previous one, and each
/// of its lines within `timeout` of the last.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    get: &(dyn Fn() -> Zeroizing<String> + Send + Sync),
    timeout: Duration,
) {
    let mut stream = BufReader::new(stream);
    loop {
        match read_request(&mut stream, timeout).await {
            Ok(Request::Get) => {
                let mut answer = get();
                answer.push_str("errno=0\n\n");
                if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
            Ok(Request::Set { keys, more }) => {
                warn!(
                    asked = keys.join(","),
                    more_keys = more,
                    "refused a `wg set`: peers and keys are managed by the config file; edit it and reload instead"
                );
                if answer_errno(stream.get_mut(), EPERM).await.is_err() {
                    return;
                }
            }
            Err(End::Closed | End::Gone) => return,
            Err(End::Invalid(why)) => {
                debug!("invalid request ({why}); closing the connection");
                let _ = answer_errno(stream.get_mut(), EINVAL).await;
                return;
            }
        }
    }
}

async fn answer_errno<W: AsyncWrite + Unpin>(w: &mut W, errno: i32) -> io::Result<()> {
    w.write_all(format!("errno=-{errno}\n\n").as_bytes())
        .await?;
    w.flush().await
}

/// Serves the UAPI for `site` on `path` (normally
/// [`crate::config::default_uapi_socket`]).
pub(crate) async fn serve(path: &Path, site: LiveSite) -> io::Result<UnixServer> {
    serve_with(path, move || {
        encode(&site.snapshot(SystemTime::now()), &site.private_key())
    })
    .await
}

/// [`serve`] with any source of `get=1` answers (tests).
pub(crate) async fn serve_with(
    path: &Path,
    get: impl Fn() -> Zeroizing<String> + Send + Sync + 'static,
) -> io::Result<UnixServer> {
    let get: Arc<dyn Fn() -> Zeroizing<String> + Send + Sync> = Arc::new(get);
    let server = UnixServer::serve(path, "uapi", LIMITS, move |conn: UnixStream| {
        let get = Arc::clone(&get);
        async move { handle(conn, get.as_ref(), READ_TIMEOUT).await }
    })
    .await?;
    info!(path = %path.display(), "serving the WireGuard UAPI (`wg show`)");
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::super::snapshot;
    use super::*;
    use ipnet::IpNet;
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};

    const KEY: [u8; 32] = [0x11; 32];

    /// The `get=1` answer of the example snapshot.
    fn device() -> Zeroizing<String> {
        encode(&snapshot::example(), &KEY)
    }

    #[test]
    fn get_answer_is_what_wg_parses() {
        let text = device();
        let expected = format!(
            "private_key={}\nlisten_port=51820\n\
             public_key={}\nprotocol_version=1\nendpoint=192.0.2.2:51820\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n\
             tx_bytes=1000\nrx_bytes=2000\npersistent_keepalive_interval=25\n\
             allowed_ip=10.1.0.0/16\nallowed_ip=fd00:1::/64\n\
             public_key={}\nprotocol_version=1\n\
             last_handshake_time_sec=1699999943\nlast_handshake_time_nsec=700000000\n\
             tx_bytes=300\nrx_bytes=400\npersistent_keepalive_interval=0\n\
             allowed_ip=100.64.0.0/16\n\
             public_key={}\nprotocol_version=1\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\n",
            "11".repeat(32),
            "bb".repeat(32),
            "cc".repeat(32),
            "01".repeat(32),
        );
        assert_eq!(text.as_str(), expected);
    }

    #[test]
    fn endpoints_and_networks_are_formatted_for_wg() {
        let mut s = snapshot::example();
        s.peers.truncate(1);
        s.peers[0].endpoint = Some(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
            4500,
        ));
        // A host address with a prefix: the network is what is printed.
        let host: IpNet = "10.1.2.3/16".parse().expect("net");
        s.peers[0].views = vec![snapshot::ViewSnapshot {
            real: host,
            view: host,
        }];
        let text = encode(&s, &KEY);
        assert!(
            text.contains("\nendpoint=[2001:db8::7]:4500\n"),
            "{}",
            text.as_str()
        );
        assert!(
            text.contains("\nallowed_ip=10.1.0.0/16\n"),
            "{}",
            text.as_str()
        );
    }

    /// Runs `handle` against `input` and returns everything it answered.
    async fn exchange(input: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let served =
            tokio::spawn(async move { handle(server, &device, Duration::from_secs(5)).await });
        // The handler may close before it read everything (that is the point
        // of some tests): a failed write is expected then.
        let _ = client.write_all(input).await;
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut out)
            .await
            .expect("read");
        served.await.expect("handler");
        String::from_utf8(out).expect("utf-8")
    }

    async fn exchange_then_close(input: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let served =
            tokio::spawn(async move { handle(server, &device, Duration::from_secs(5)).await });
        client.write_all(input).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut out)
            .await
            .expect("read");
        served.await.expect("handler");
        String::from_utf8(out).expect("utf-8")
    }

    #[tokio::test]
    async fn get_then_close() {
        let out = exchange_then_close(b"get=1\n\n").await;
        assert!(out.starts_with("private_key="), "{out}");
        assert!(
            out.ends_with("persistent_keepalive_interval=0\nerrno=0\n\n"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn several_requests_on_one_connection() {
        let out = exchange_then_close(b"get=1\n\nget=1\n\n").await;
        assert_eq!(out.matches("errno=0\n\n").count(), 2, "{out}");
    }

    #[tokio::test]
    async fn set_is_refused_with_eperm_after_reading_it_all() {
        let set = format!(
            "set=1\nprivate_key={}\nlisten_port=1\nreplace_peers=true\npublic_key={}\nendpoint=[::1]:9\n\
             allowed_ip=0.0.0.0/0\n\n",
            "22".repeat(32),
            "33".repeat(32)
        );
        assert_eq!(exchange_then_close(set.as_bytes()).await, "errno=-1\n\n");
        // An empty set is refused too, and the connection stays usable.
        let out = exchange_then_close(b"set=1\n\nget=1\n\n").await;
        assert!(out.starts_with("errno=-1\n\nprivate_key="), "{out}");
    }

    #[tokio::test]
    async fn garbage_gets_einval_and_the_connection_closes() {
        for input in [
            &b"hello\n"[..],
            b"get=1\nx\n",
            b"get=2\n\n",
            b"set=1\nno equals sign\n\n",
            b"set=1\n=value\n\n",
            b"set=1\nKEY=value\n\n",
            b"\n",
            b"get=1\xff\n\n",
            // No newline needed to tell these are not an operation.
            &[0xff; 300],
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            // The handler closes by itself: no shutdown from this side.
            assert_eq!(exchange(input).await, "errno=-22\n\n", "input {input:?}");
        }
        // The connection is closed after the error, even if more follows.
        assert_eq!(exchange(b"bogus\nget=1\n\n").await, "errno=-22\n\n");
    }

    #[tokio::test]
    async fn overlong_lines_and_requests_are_refused() {
        let mut long = b"set=1\nendpoint=".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_LINE + 10));
        long.extend_from_slice(b"\n\n");
        assert_eq!(exchange(&long).await, "errno=-22\n\n");
        let mut big = b"set=1\n".to_vec();
        let line = format!("allowed_ip=10.0.0.0/8{}\n", " ".repeat(1000));
        while big.len() <= MAX_REQUEST + 2000 {
            big.extend_from_slice(line.as_bytes());
        }
        big.extend_from_slice(b"\n");
        assert_eq!(exchange(&big).await, "errno=-22\n\n");
    }

    /// A request as large as allowed, made of distinct keys, is read in
    /// time linear in its size (de-duplicating 400 000 keys against each
    /// other took minutes), and only a bounded list of keys is kept.
    #[tokio::test]
    async fn a_large_set_of_distinct_keys_stays_bounded() {
        let mut big = b"set=1\n".to_vec();
        let mut n = 0u64;
        while big.len() < MAX_REQUEST - 64 {
            // Distinct lowercase keys: n written in base 26.
            let mut key = Vec::new();
            let mut x = n;
            loop {
                key.push(b'a' + (x % 26) as u8);
                x /= 26;
                if x == 0 {
                    break;
                }
            }
            big.extend_from_slice(&key);
            big.extend_from_slice(b"=1\n");
            n += 1;
        }
        big.extend_from_slice(b"\n");
        assert!(n > 400_000, "{n} keys");
        // On a thread of its own: a reader that never waits cannot be timed
        // out by its own runtime.
        let (tx, rx) = std::sync::mpsc::channel();
        let request = big.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut reader = &request[..];
            let _ = tx.send(rt.block_on(read_request(&mut reader, Duration::from_secs(5))));
        });
        let read = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a large set=1 request took too long to read");
        match read {
            Ok(Request::Set { keys, more }) => {
                assert_eq!(keys.len(), MAX_LOGGED_KEYS);
                assert_eq!(keys.len() + more, usize::try_from(n).expect("n"));
            }
            Ok(Request::Get) => panic!("read as get"),
            Err(_) => panic!("refused"),
        }
        // And the client gets its EPERM.
        assert_eq!(exchange(&big).await, "errno=-1\n\n");
    }

    #[tokio::test]
    async fn truncated_requests_close_quietly() {
        assert_eq!(exchange_then_close(b"").await, "");
        assert_eq!(exchange_then_close(b"get=1\n").await, "");
        assert_eq!(exchange_then_close(b"set=1\npublic_key=00\n").await, "");
        assert_eq!(exchange_then_close(b"get=").await, "");
    }

    #[tokio::test]
    async fn silent_clients_are_dropped() {
        let timeout = Duration::from_millis(50);
        for input in [&b""[..], b"get=1\n", b"set=1\npublic_key=00\n", b"ge"] {
            let (mut client, server) = tokio::io::duplex(1024);
            client.write_all(input).await.expect("write");
            let served = tokio::spawn(async move { handle(server, &device, timeout).await });
            tokio::time::timeout(Duration::from_secs(5), served)
                .await
                .expect("handler gave up")
                .expect("handler");
        }
    }

    async fn query(path: &Path, request: &[u8]) -> String {
        let mut conn = UnixStream::connect(path).await.expect("connect");
        conn.write_all(request).await.expect("write");
        conn.shutdown().await.expect("shutdown");
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut out)
            .await
            .expect("read");
        out
    }

    #[tokio::test]
    async fn many_clients_and_garbage_do_not_stop_the_server() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cw1.sock");
        let _served = serve_with(&path, device).await.expect("serve");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..(LIMITS.max_connections * 3) {
            let path = path.clone();
            tasks.spawn(async move {
                let request: &[u8] = if i % 2 == 0 {
                    b"get=1\n\n"
                } else {
                    b"\x00\x01garbage\n"
                };
                query(&path, request).await
            });
        }
        while let Some(out) = tasks.join_next().await {
            let out = out.expect("task");
            assert!(
                out.ends_with("errno=0\n\n") || out == "errno=-22\n\n",
                "{out}"
            );
        }
        assert!(query(&path, b"get=1\n\n").await.ends_with("errno=0\n\n"));
    }
}
