//! What every end-to-end test needs: labs, daemons, traffic.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use causeway::keys;
use causeway::observe::Status;
use causeway_testbed::{ChildGuard, Lab, LabSpec, Netns, Site, SiteSpec};
use sha2::{Digest, Sha256};

pub const PORT: u16 = 51820;

/// The `causeway` binary cargo built for these tests.
pub fn causeway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_causeway")
}

/// A two-site lab: `a` exports 10.0.0.0/16, `b` exports 10.1.0.0/16.
pub fn two_sites() -> Lab {
    let site = |name: &str, cidr: &str| SiteSpec::new(name, vec![cidr.parse().expect("cidr")]);
    Lab::build(&LabSpec {
        sites: vec![site("a", "10.0.0.0/16"), site("b", "10.1.0.0/16")],
    })
    .expect("build lab")
}

/// A site's identity and config files, in a temporary directory.
pub struct SiteFiles {
    pub dir: tempfile::TempDir,
    pub public_key: String,
}

impl SiteFiles {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = keys::generate();
        let private_key = keys::encode_private(&secret);
        let public_key = keys::encode_public(&x25519_dalek::PublicKey::from(&secret));
        std::fs::write(dir.path().join("private.key"), format!("{private_key}\n"))
            .expect("write key");
        SiteFiles { dir, public_key }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("control.sock")
    }

    /// Writes `causeway.toml` for site `name` with the given `[[peer]]`
    /// tables (already formatted).
    pub fn write_config(&self, name: &str, pod_cidrs: &[&str], peers: &str) -> PathBuf {
        let cidrs: Vec<String> = pod_cidrs.iter().map(|c| format!("{c:?}")).collect();
        let text = format!(
            "[site]\nname = {name:?}\nprivate_key_file = {key:?}\ninterface = \"causeway0\"\nlisten_port = {PORT}\n\
             pod_cidrs = [{cidrs}]\ncontrol_socket = {sock:?}\nuapi_socket = {uapi:?}\nstate_dir = {state:?}\n\n{peers}",
            key = self.path("private.key"),
            sock = self.socket(),
            // Every test's interface is "causeway0", each in its own
            // namespace, but /var/run/wireguard is host-wide: tests that
            // run `wg` use their own interface names (e2e/uapi.rs).
            uapi = self.path("uapi.sock"),
            state = self.dir.path(),
            cidrs = cidrs.join(", "),
        );
        let path = self.path("causeway.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Another set of files (own sockets, state, logs) with this key.
    pub fn clone_key(&self) -> SiteFiles {
        let other = SiteFiles::new();
        std::fs::copy(self.path("private.key"), other.path("private.key")).expect("copy key");
        SiteFiles {
            dir: other.dir,
            public_key: self.public_key.clone(),
        }
    }
}

/// A `[[peer]]` table.
pub fn peer_toml(
    name: &str,
    public_key: &str,
    cidrs: &[&str],
    endpoint: Option<SocketAddr>,
) -> String {
    let cidrs: Vec<String> = cidrs.iter().map(|c| format!("{c:?}")).collect();
    let mut s = format!(
        "[[peer]]\nname = {name:?}\npublic_key = {public_key:?}\ncidrs = [{}]\n",
        cidrs.join(", ")
    );
    if let Some(ep) = endpoint {
        s += &format!("endpoint = \"{ep}\"\n");
    }
    s + "\n"
}

/// A running `causeway up` in a gateway namespace.
pub struct Daemon {
    pub child: ChildGuard,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon and waits until its control socket answers.
    pub fn start(ns: &Netns, files: &SiteFiles, config: &Path) -> Daemon {
        Self::start_with(ns, files, config, &[])
    }

    /// [`Daemon::start`] with extra `causeway up` arguments.
    pub fn start_with(ns: &Netns, files: &SiteFiles, config: &Path, args: &[&str]) -> Daemon {
        let mut cmd = ns.command(causeway_bin());
        cmd.args(["up", "--config"]).arg(config).args(args);
        Self::start_command(ns, files, cmd)
    }

    /// Starts `cmd`, built with `ns.command(…)`, that runs `causeway up`
    /// (or a wrapper that ends by exec'ing it, so that the process held is
    /// the daemon), its stderr in a new log in `files`; waits until its
    /// control socket answers.
    pub fn start_command(ns: &Netns, files: &SiteFiles, mut cmd: std::process::Command) -> Daemon {
        let log = files.path(&format!("daemon-{}.log", now_ms()));
        let out = std::fs::File::create(&log).expect("log file");
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out);
        let child = ns.spawn(&mut cmd).expect("spawn causeway");
        let mut daemon = Daemon {
            child,
            socket: files.socket(),
            log,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.try_status().is_some() {
                return;
            }
            if let Ok(Some(status)) = self.child.wait_timeout(Duration::from_millis(50)) {
                panic!("causeway exited early ({status}):\n{}", self.log_text());
            }
        }
        panic!("causeway did not become ready:\n{}", self.log_text());
    }

    pub fn try_status(&self) -> Option<Status> {
        let out = std::process::Command::new(causeway_bin())
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> Status {
        self.try_status()
            .unwrap_or_else(|| panic!("no status from daemon:\n{}", self.log_text()))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and asserts a clean exit.
    pub fn stop(mut self) {
        let status = self
            .child
            .stop(Duration::from_secs(5))
            .expect("stop daemon");
        assert!(
            status.success(),
            "causeway exited with {status}:\n{}",
            self.log_text()
        );
    }

    pub fn drops(&self, peer: &str, reason: &str) -> u64 {
        let status = self.status();
        let p = status
            .peers
            .iter()
            .find(|p| p.name == peer)
            .expect("peer in status");
        p.drops.get(reason).copied().unwrap_or(0)
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// One site of a [`Mesh`].
pub struct SiteDef<'a> {
    pub name: &'a str,
    pub pod_cidrs: &'a [&'a str],
    /// `[[peer.allow]]` tables to put under the named peer's `[[peer]]`.
    pub allow: &'a [(&'a str, &'a str)],
    /// Appended to the config (more `[[peer]]` tables).
    pub extra: &'a str,
}

impl<'a> SiteDef<'a> {
    pub fn new(name: &'a str, pod_cidrs: &'a [&'a str]) -> Self {
        SiteDef {
            name,
            pod_cidrs,
            allow: &[],
            extra: "",
        }
    }
}

/// Sites that all peer with each other by static endpoints, a daemon each.
pub struct Mesh {
    pub lab: Lab,
    pub files: Vec<SiteFiles>,
    pub configs: Vec<PathBuf>,
    pub daemons: Vec<Option<Daemon>>,
}

/// The classic pair: `a` with 10.0.0.0/16, `b` with 10.1.0.0/16.
pub type Joined = Mesh;

impl Mesh {
    pub fn new() -> Self {
        Self::with_extra_peers(["", ""])
    }

    /// The pair, with more `[[peer]]` tables appended to each site's config.
    pub fn with_extra_peers(extra: [&str; 2]) -> Self {
        let mut a = SiteDef::new("a", &["10.0.0.0/16"]);
        a.extra = extra[0];
        let mut b = SiteDef::new("b", &["10.1.0.0/16"]);
        b.extra = extra[1];
        Self::build(&[a, b], false)
    }

    /// Builds the lab, writes every config and starts every daemon. With
    /// `underlay_v6` the peers' endpoints are their IPv6 addresses.
    pub fn build(defs: &[SiteDef<'_>], underlay_v6: bool) -> Self {
        let spec = LabSpec {
            sites: defs
                .iter()
                .map(|d| {
                    SiteSpec::new(
                        d.name,
                        d.pod_cidrs
                            .iter()
                            .map(|c| c.parse().expect("cidr"))
                            .collect(),
                    )
                })
                .collect(),
        };
        let lab = Lab::build(&spec).expect("build lab");
        let files: Vec<SiteFiles> = defs.iter().map(|_| SiteFiles::new()).collect();
        let mut configs = Vec::new();
        for (i, def) in defs.iter().enumerate() {
            let mut peers = String::new();
            for (k, other) in defs.iter().enumerate().filter(|(k, _)| *k != i) {
                let site = lab.site(other.name);
                let ip = if underlay_v6 {
                    IpAddr::V6(site.wan_addr6)
                } else {
                    site.wan_addr
                };
                peers += &peer_toml(
                    other.name,
                    &files[k].public_key,
                    other.pod_cidrs,
                    Some(SocketAddr::new(ip, PORT)),
                );
                for (_, rules) in def.allow.iter().filter(|(peer, _)| *peer == other.name) {
                    peers += rules;
                    peers += "\n";
                }
            }
            peers += def.extra;
            configs.push(files[i].write_config(def.name, def.pod_cidrs, &peers));
        }
        let daemons = (0..defs.len())
            .map(|i| {
                Some(Daemon::start(
                    &lab.sites()[i].gateway,
                    &files[i],
                    &configs[i],
                ))
            })
            .collect();
        Mesh {
            lab,
            files,
            configs,
            daemons,
        }
    }

    pub fn site(&self, i: usize) -> &Site {
        &self.lab.sites()[i]
    }

    pub fn daemon(&self, i: usize) -> &Daemon {
        self.daemons[i].as_ref().expect("daemon running")
    }

    pub fn pod(&self, i: usize) -> (&Netns, Ipv4Addr) {
        let pod = &self.site(i).pods[0];
        (&pod.ns, pod.addr)
    }

    /// Stops site `i`'s daemon (cleanly) and starts it again.
    pub fn restart(&mut self, i: usize) {
        self.restart_with(i, &[]);
    }

    /// [`Mesh::restart`] with extra `causeway up` arguments.
    pub fn restart_with(&mut self, i: usize, args: &[&str]) {
        if let Some(d) = self.daemons[i].take() {
            d.stop();
        }
        self.daemons[i] = Some(Daemon::start_with(
            &self.lab.sites()[i].gateway,
            &self.files[i],
            &self.configs[i],
            args,
        ));
    }
}

/// Calls `probe` every 50 ms until it gives `Some`, for at most `within`;
/// `None` after that (the caller panics with what it knows).
pub fn poll<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`poll`] for a condition: whether it held within `within`.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    poll(within, || cond().then_some(())).is_some()
}

/// Pings until a reply comes or `within` passes.
pub fn ping_until(ns: &Netns, dst: IpAddr, within: Duration) -> Option<Duration> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(rtt)) = ns.ping(dst, Duration::from_millis(500)) {
            return Some(rtt);
        }
    }
    None
}

/// Asserts that `from` reaches `to` over the tunnel.
pub fn assert_ping(from: &Netns, to: IpAddr) {
    assert!(
        ping_until(from, to, Duration::from_secs(10)).is_some(),
        "{} cannot ping {to}",
        from.name()
    );
}

/// Deterministic pseudo-random bytes (xorshift), so that corruption shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `len` bytes over TCP from `client` to `server` (listening on
/// `server_addr`) and asserts that the SHA-256 of what arrived matches.
pub fn tcp_transfer(server: &Netns, server_addr: impl Into<IpAddr>, client: &Netns, len: usize) {
    let addr = server_addr.into();
    tcp_transfer_via(server, addr, client, addr, len);
}

/// [`tcp_transfer`] where the client dials `connect` (e.g. the server's
/// address as the client's site views it) and the server binds `bind`.
pub fn tcp_transfer_via(server: &Netns, bind: IpAddr, client: &Netns, connect: IpAddr, len: usize) {
    let port = 5001;
    let listener = server.enter(|| TcpListener::bind((bind, port)).expect("bind"));
    let data = pattern(len, len as u64);
    let sent_digest = Sha256::digest(&data);
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut conn = accept_within(&listener, Duration::from_secs(40));
            conn.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0usize;
            loop {
                let n = conn.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                total += n;
            }
            (total, hasher.finalize())
        });
        let mut conn = client.enter(|| {
            TcpStream::connect_timeout(&SocketAddr::new(connect, port), Duration::from_secs(10))
                .expect("connect")
        });
        conn.set_write_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        conn.write_all(&data).expect("send");
        drop(conn);
        let (total, digest) = receiver.join().expect("receiver");
        assert_eq!(total, len, "byte count");
        assert_eq!(digest, sent_digest, "SHA-256 of the transfer");
    });
}

/// Accepts one connection, or panics after `within` (a client that never
/// connects must fail the test, not hang it).
pub fn accept_within(listener: &TcpListener, within: Duration) -> TcpStream {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + within;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).expect("blocking");
                return conn;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection within {within:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The MSS a TCP connection from `client` to `connect` settles on, as the
/// client's kernel reports it (`TCP_MAXSEG`): what the server's SYN-ACK
/// advertised, after any clamping on the way.
pub fn tcp_mss(server: &Netns, bind: IpAddr, client: &Netns, connect: IpAddr) -> u32 {
    use std::os::fd::AsRawFd;
    let port = 5002;
    let listener = server.enter(|| TcpListener::bind((bind, port)).expect("bind"));
    let conn = client.enter(|| {
        TcpStream::connect_timeout(&SocketAddr::new(connect, port), Duration::from_secs(10))
            .expect("connect")
    });
    let _accepted = listener.accept().expect("accept");
    let mut mss: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: TCP_MAXSEG writes one int into `mss`, whose size `len` gives.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mut mss as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    mss as u32
}

/// Sends `count` UDP datagrams of varied sizes and asserts every one that
/// arrived is intact and that nearly all arrived.
pub fn udp_exchange(server: &Netns, server_addr: impl Into<IpAddr>, client: &Netns, count: usize) {
    let addr = server_addr.into();
    udp_exchange_via(server, addr, client, addr, count, 1300, 95);
}

/// [`udp_exchange`] with the server bound to `bind`, the client sending to
/// `connect`, datagrams of up to `max_len` bytes, and at least `percent` %
/// required to arrive.
pub fn udp_exchange_via(
    server: &Netns,
    bind: IpAddr,
    client: &Netns,
    connect: IpAddr,
    count: usize,
    max_len: usize,
    percent: usize,
) {
    let port = 5002;
    let rx = server.enter(|| UdpSocket::bind((bind, port)).expect("bind"));
    rx.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    // A roomy receive buffer, so that a receiver thread descheduled on a
    // busy machine does not count as tunnel loss.
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            4,
        );
    }
    let unspecified: IpAddr = if connect.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let tx = client.enter(|| UdpSocket::bind((unspecified, 0)).expect("bind"));
    let datagram = |i: usize| {
        let len = 8 + (i * 37) % (max_len - 7);
        let mut d = pattern(len, i as u64 + 7);
        d[..8].copy_from_slice(&(i as u64).to_be_bytes());
        d
    };
    let seen = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut seen = vec![false; count];
            let mut buf = vec![0u8; 2048];
            while let Ok(n) = rx.recv(&mut buf) {
                let i = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
                assert!(i < count, "unknown datagram {i}");
                assert_eq!(&buf[..n], &datagram(i)[..], "datagram {i} corrupted");
                seen[i] = true;
                if seen.iter().all(|s| *s) {
                    break;
                }
            }
            seen
        });
        for i in 0..count {
            // The first datagrams may meet a smaller path MTU and be
            // answered with ICMP "too big" instead: counted as lost.
            let _ = tx.send_to(&datagram(i), (connect, port));
            // Paced (~4000 datagrams/s): this is about integrity, not
            // about how much a busy 2-core machine can take in a burst.
            if i % 4 == 3 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        receiver.join().expect("receiver")
    });
    let arrived = seen.iter().filter(|s| **s).count();
    assert!(
        arrived * 100 >= count * percent,
        "only {arrived} of {count} datagrams arrived"
    );
}

/// The rendezvous' QUIC port in the labs.
pub const RENDEZVOUS_QUIC_PORT: u16 = 7443;
/// The rendezvous' STUN port in the labs.
pub const RENDEZVOUS_STUN_PORT: u16 = 3478;
/// The rendezvous' TLS-over-TCP port in the labs (the sites' default).
pub const RENDEZVOUS_TCP_PORT: u16 = 443;

/// A rendezvous server running in the lab's internet namespace.
pub struct Rendezvous {
    pub child: Option<ChildGuard>,
    pub public_key: String,
    /// Extra command-line arguments (e.g. `--metrics-listen=…`).
    args: Vec<String>,
    dir: tempfile::TempDir,
    log: std::path::PathBuf,
}

impl Rendezvous {
    /// Writes a config serving `sites` (name, public key) and starts it.
    pub fn start(ns: &Netns, ip: IpAddr, sites: &[(&str, &str)]) -> Rendezvous {
        Self::start_on(
            ns,
            ip,
            RENDEZVOUS_QUIC_PORT,
            RENDEZVOUS_STUN_PORT,
            RENDEZVOUS_TCP_PORT,
            sites,
            &[],
        )
    }

    /// [`Rendezvous::start`] on other ports (QUIC, STUN, TLS over TCP), with
    /// extra arguments.
    pub fn start_on(
        ns: &Netns,
        ip: IpAddr,
        quic: u16,
        stun: u16,
        tcp: u16,
        sites: &[(&str, &str)],
        args: &[String],
    ) -> Rendezvous {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = keys::generate();
        std::fs::write(
            dir.path().join("rendezvous.key"),
            keys::encode_private(&secret) + "\n",
        )
        .expect("key");
        let public_key = keys::encode_public(&x25519_dalek::PublicKey::from(&secret));
        let mut text = format!(
            "private_key_file = {:?}\nlisten = \"{}\"\nstun_listen = \"{}\"\ntcp_listen = \"{}\"\n",
            dir.path().join("rendezvous.key"),
            SocketAddr::new(ip, quic),
            SocketAddr::new(ip, stun),
            SocketAddr::new(ip, tcp)
        );
        for (name, key) in sites {
            text += &format!("\n[[site]]\nname = {name:?}\npublic_key = {key:?}\n");
        }
        std::fs::write(dir.path().join("rendezvous.toml"), text).expect("config");
        let log = dir.path().join("rendezvous.log");
        let mut r = Rendezvous {
            child: None,
            public_key,
            args: args.to_vec(),
            dir,
            log,
        };
        r.restart(ns);
        r
    }

    pub fn restart(&mut self, ns: &Netns) {
        self.child = None;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = ns.command(causeway_bin());
        cmd.args(["rendezvous", "--config"])
            .arg(self.dir.path().join("rendezvous.toml"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(out);
        self.child = Some(ns.spawn(&mut cmd).expect("spawn rendezvous"));
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.stop(Duration::from_secs(5));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An interface name no other test in this run uses: `prefix`, this
/// process' id and a counter (the leftover check in scripts/test.sh knows
/// the `wgt` prefix of wireguard-go's).
pub fn unique_ifname(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 1_000_000,
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// `GET path` over HTTP/1.1 from inside `ns`: the status code and the body.
pub fn try_get(ns: &Netns, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let raw = ns.enter(|| {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        conn.read_to_string(&mut raw)?;
        Ok::<_, std::io::Error>(raw)
    })?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not HTTP: {raw:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head}"));
    Ok((status, body.to_owned()))
}

/// [`try_get`], which must succeed.
pub fn get(ns: &Netns, addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(ns, addr, path).unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// The samples of a text exposition: `name{labels}` → value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line: {l}"));
            (
                key.to_owned(),
                value.parse().unwrap_or_else(|_| panic!("value of {l}")),
            )
        })
        .collect()
}

/// Runs a ping train from `from` to `to` for `total` (one ping every 20 ms,
/// each waiting up to 100 ms for its reply), calling `during` after `at`;
/// returns the longest time without a reply (from the start, between
/// replies, and to the end) and the number of replies.
pub fn ping_train(
    from: &Netns,
    to: std::net::Ipv4Addr,
    total: Duration,
    at: Duration,
    during: impl FnOnce(),
) -> (Duration, usize) {
    std::thread::scope(|scope| {
        let start = Instant::now();
        let train = scope.spawn(move || {
            let mut replies = Vec::new();
            while start.elapsed() < total {
                let sent = Instant::now();
                if let Ok(Some(_)) = from.ping(to.into(), Duration::from_millis(100)) {
                    replies.push(Instant::now());
                }
                if let Some(wait) =
                    (sent + Duration::from_millis(20)).checked_duration_since(Instant::now())
                {
                    std::thread::sleep(wait);
                }
            }
            replies
        });
        std::thread::sleep(at);
        during();
        let replies = train.join().expect("ping thread");
        let mut longest = Duration::ZERO;
        let mut last = start;
        for t in replies
            .iter()
            .copied()
            .chain(std::iter::once(start + total))
        {
            longest = longest.max(t.saturating_duration_since(last));
            last = t;
        }
        (longest, replies.len())
    })
}

/// Pings `to` from `from` every 20 ms (each waiting up to 100 ms) until
/// stopped; [`PingTrain::stop`] gives the longest time without a reply.
pub struct PingTrain {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Instant, Vec<Instant>)>,
}

impl PingTrain {
    pub fn start(from: &Netns, to: Ipv4Addr) -> PingTrain {
        let stop = Arc::new(AtomicBool::new(false));
        let ns = from.alias();
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut replies = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let sent = Instant::now();
                if let Ok(Some(_)) = ns.ping(to.into(), Duration::from_millis(100)) {
                    replies.push(Instant::now());
                }
                if let Some(wait) =
                    (sent + Duration::from_millis(20)).checked_duration_since(Instant::now())
                {
                    std::thread::sleep(wait);
                }
            }
            (start, replies)
        });
        PingTrain { stop, thread }
    }

    /// Stops the train: the longest gap between replies (and from the
    /// start and to the end), and the number of replies.
    pub fn stop(self) -> (Duration, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let end = Instant::now();
        let (start, replies) = self.thread.join().expect("ping thread");
        let mut longest = Duration::ZERO;
        let mut last = start;
        for t in replies.iter().copied().chain(std::iter::once(end)) {
            longest = longest.max(t.saturating_duration_since(last));
            last = t;
        }
        (longest, replies.len())
    }
}

/// Sends `len` bytes from `client` to `server` (bound to `bind`, dialled
/// at `connect`), calling `at_fail` once `fail_after` bytes have arrived
/// (to cause a failure in the middle of the transfer); asserts the
/// SHA-256 of what arrived.
pub fn transfer_across(
    server: &Netns,
    bind: Ipv4Addr,
    client: &Netns,
    connect: Ipv4Addr,
    len: usize,
    fail_after: usize,
    at_fail: impl FnOnce(),
) {
    let port = 5002;
    let listener = server.enter(|| TcpListener::bind((bind, port)).expect("bind"));
    let data = pattern(len, 0xfa11);
    let sent_digest = Sha256::digest(&data);
    let received = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut conn = accept_within(&listener, Duration::from_secs(40));
            conn.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = conn.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                received.fetch_add(n, Ordering::Relaxed);
            }
            hasher.finalize()
        });
        let sender = s.spawn(|| {
            let mut conn = client.enter(|| {
                TcpStream::connect_timeout(
                    &SocketAddr::new(connect.into(), port),
                    Duration::from_secs(10),
                )
                .expect("connect")
            });
            conn.set_write_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            conn.write_all(&data).expect("send");
        });
        let t = Instant::now();
        while received.load(Ordering::Relaxed) < fail_after {
            assert!(t.elapsed() < Duration::from_secs(60), "transfer stalled");
            std::thread::sleep(Duration::from_millis(2));
        }
        at_fail();
        sender.join().expect("sender");
        let digest = receiver.join().expect("receiver");
        assert_eq!(received.load(Ordering::Relaxed), len, "byte count");
        assert_eq!(digest, sent_digest, "SHA-256 of the transfer");
    });
}

/// The gateways' cluster endpoint port.
pub const CLUSTER_PORT: u16 = 7473;
/// The node agents' metrics port (on each node's loopback).
pub const NODE_METRICS: &str = "127.0.0.1:9470";

/// A running `causeway node`.
pub struct NodeAgent {
    pub child: ChildGuard,
    pub log: PathBuf,
    pub config: PathBuf,
}

impl NodeAgent {
    pub fn start(
        ns: &Netns,
        dir: &Path,
        name: &str,
        gateways: &[Ipv4Addr],
        secret: &Path,
    ) -> NodeAgent {
        let config = dir.join(format!("{name}.toml"));
        let gateways: Vec<String> = gateways
            .iter()
            .map(|g| format!("\"{g}:{CLUSTER_PORT}\""))
            .collect();
        std::fs::write(
            &config,
            format!(
                "gateways = [{}]\nsecret_file = {secret:?}\nmetrics_listen = \"{NODE_METRICS}\"\n",
                gateways.join(", ")
            ),
        )
        .expect("node config");
        let log = dir.join(format!("{name}.log"));
        let child = spawn_agent(ns, &config, &log);
        NodeAgent { child, log, config }
    }

    pub fn restart(&mut self, ns: &Netns) {
        self.child = spawn_agent(ns, &self.config, &self.log);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub fn spawn_agent(ns: &Netns, config: &Path, log: &Path) -> ChildGuard {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let mut cmd = ns.command(causeway_bin());
    cmd.args(["node", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out);
    ns.spawn(&mut cmd).expect("spawn causeway node")
}

/// Where `status`'s site sees `addr` of its only peer (its first view).
pub fn view_of(status: &Status, addr: Ipv4Addr) -> Ipv4Addr {
    let view = &status.peers[0].views[0];
    let real: ipnet::Ipv4Net = view.real.parse().expect("real");
    let seen: ipnet::Ipv4Net = view.view.parse().expect("view");
    Ipv4Addr::from(u32::from(seen.network()) + (u32::from(addr) - u32::from(real.network())))
}

/// The positions of the running daemons (gateway replicas) that say they
/// are the site's active one.
pub fn active_replicas<'a>(daemons: impl IntoIterator<Item = Option<&'a Daemon>>) -> Vec<usize> {
    daemons
        .into_iter()
        .enumerate()
        .filter(|(_, d)| {
            d.and_then(Daemon::try_status)
                .is_some_and(|s| s.role == causeway::core::Role::Active)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Waits until `actives` names exactly one replica and returns it; panics
/// with `logs` after `within`.
pub fn wait_one_active(
    actives: impl Fn() -> Vec<usize>,
    within: Duration,
    logs: impl Fn() -> String,
) -> usize {
    let t = Instant::now();
    loop {
        let now_active = actives();
        if now_active.len() == 1 {
            return now_active[0];
        }
        assert!(
            t.elapsed() < within,
            "active replicas: {now_active:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
