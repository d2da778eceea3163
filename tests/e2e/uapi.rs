//! `wg` from wireguard-tools reads a causeway interface through the
//! WireGuard UAPI socket: `wg show`, `wg show <if> dump` and `wg showconf`
//! print its peers, endpoints, allowed IPs, handshakes and counters; `wg set`
//! fails cleanly; garbage on the socket disturbs nothing; a crashed run's
//! socket is replaced.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use causeway_testbed::{Lab, Netns};

use crate::common::*;

/// Sets `key = value` (value in TOML syntax) in the `[site]` table of the
/// config at `path`, replacing the key's line if there is one; `None`
/// removes the key.
pub fn set_site_key(path: &Path, key: &str, value: Option<&str>) {
    let text = std::fs::read_to_string(path).expect("read config");
    let prefix = format!("{key} =");
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.starts_with(&prefix)) {
        out += line;
        out += "\n";
        if let (Some(value), "[site]") = (value, line) {
            out += &format!("{key} = {value}\n");
        }
    }
    std::fs::write(path, out).expect("write config");
}

/// Two sites, `a` (10.0.0.0/16) and `b` (10.1.0.0/16), joined by static
/// endpoints, each on its own uniquely named interface, with extra `[site]`
/// keys per site.
pub struct Pair {
    pub lab: Lab,
    pub files: Vec<SiteFiles>,
    pub configs: Vec<PathBuf>,
    pub ifnames: Vec<String>,
    pub daemons: Vec<Option<Daemon>>,
}

impl Pair {
    pub fn start(site_keys: [&[(&str, &str)]; 2]) -> Pair {
        let lab = two_sites();
        let files = vec![SiteFiles::new(), SiteFiles::new()];
        let ifnames = vec![unique_ifname("cwu"), unique_ifname("cwu")];
        let defs = [("a", "10.0.0.0/16"), ("b", "10.1.0.0/16")];
        let mut configs = Vec::new();
        for i in 0..2 {
            let k = 1 - i;
            let (name, cidr) = defs[i];
            let (other, other_cidr) = defs[k];
            let endpoint = SocketAddr::new(lab.site(other).wan_addr, PORT);
            let peers = peer_toml(other, &files[k].public_key, &[other_cidr], Some(endpoint));
            let config = files[i].write_config(name, &[cidr], &peers);
            set_site_key(&config, "interface", Some(&format!("{:?}", ifnames[i])));
            // The default socket, derived from the interface name, is the
            // one `wg` looks for.
            set_site_key(&config, "uapi_socket", None);
            for (key, value) in site_keys[i] {
                set_site_key(&config, key, Some(value));
            }
            configs.push(config);
        }
        let daemons = (0..2)
            .map(|i| {
                Some(Daemon::start(
                    &lab.sites()[i].gateway,
                    &files[i],
                    &configs[i],
                ))
            })
            .collect();
        Pair {
            lab,
            files,
            configs,
            ifnames,
            daemons,
        }
    }

    pub fn gateway(&self, i: usize) -> &Netns {
        &self.lab.sites()[i].gateway
    }

    pub fn daemon(&self, i: usize) -> &Daemon {
        self.daemons[i].as_ref().expect("daemon running")
    }
}

/// Runs `program args…` in `ns`, giving up after `timeout`; returns
/// (success, stdout, stderr).
pub fn run_bounded(
    ns: &Netns,
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> (bool, String, String) {
    let mut cmd = ns.command(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ns.spawn(&mut cmd).expect("spawn");
    let status = child
        .wait_timeout(timeout)
        .expect("wait")
        .unwrap_or_else(|| {
            panic!(
                "`{program} {}` did not finish within {timeout:?}",
                args.join(" ")
            )
        });
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.child().stdout.take() {
        s.read_to_string(&mut out).expect("stdout");
    }
    if let Some(mut s) = child.child().stderr.take() {
        s.read_to_string(&mut err).expect("stderr");
    }
    (status.success(), out, err)
}

/// One peer line of `wg show <if> dump`.
#[derive(Debug)]
struct DumpPeer {
    public_key: String,
    preshared_key: String,
    endpoint: String,
    allowed_ips: String,
    latest_handshake: u64,
    rx: u64,
    tx: u64,
    keepalive: String,
}

/// Parses `wg show <if> dump`: the interface line (private key, public
/// key, port, fwmark), then one line per peer.
fn parse_dump(dump: &str) -> ([String; 4], Vec<DumpPeer>) {
    let mut lines = dump.lines();
    let iface: Vec<String> = lines
        .next()
        .expect("interface line")
        .split('\t')
        .map(str::to_owned)
        .collect();
    let iface: [String; 4] = iface
        .try_into()
        .unwrap_or_else(|f| panic!("interface line has not 4 fields: {f:?}"));
    let peers = lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 8, "peer line: {l:?}");
            DumpPeer {
                public_key: f[0].into(),
                preshared_key: f[1].into(),
                endpoint: f[2].into(),
                allowed_ips: f[3].into(),
                latest_handshake: f[4].parse().expect("handshake"),
                rx: f[5].parse().expect("rx"),
                tx: f[6].parse().expect("tx"),
                keepalive: f[7].into(),
            }
        })
        .collect();
    (iface, peers)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn uapi_request(socket: &str, request: &[u8]) -> String {
    let mut conn = UnixStream::connect(socket).expect("connect to the UAPI socket");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    conn.write_all(request).expect("write");
    // Done asking; the daemon answers what it read, then closes too.
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    conn.read_to_string(&mut out)
        .expect("the daemon must answer and close");
    out
}

#[test]
fn wg_show_prints_peers_endpoints_handshakes_and_counters() {
    let mut p = Pair::start([&[], &[]]);
    let (ifname, gw_a) = (p.ifnames[0].clone(), &p.lab.sites()[0].gateway);
    let (pod_a, pod_b) = (&p.lab.sites()[0].pods[0], &p.lab.sites()[1].pods[0]);
    assert_ping(&pod_a.ns, pod_b.addr.into());
    tcp_transfer(&pod_b.ns, pod_b.addr, &pod_a.ns, 4 << 20);
    tcp_transfer(&pod_a.ns, pod_a.addr, &pod_b.ns, 1 << 20);
    let wg = Duration::from_secs(10);

    // The machine-readable dump.
    let (ok, dump, err) = run_bounded(gw_a, "wg", &["show", &ifname, "dump"], wg);
    assert!(ok, "wg show dump failed: {err}\n{}", p.daemon(0).log_text());
    let (iface, peers) = parse_dump(&dump);
    let private_key = std::fs::read_to_string(p.files[0].path("private.key")).expect("key");
    assert_eq!(
        iface[0],
        private_key.trim(),
        "private key (dump shows it, as for kernel WireGuard)"
    );
    assert_eq!(iface[1], p.files[0].public_key, "interface public key");
    assert_eq!(iface[2], PORT.to_string(), "listen port");
    assert_eq!(iface[3], "off", "fwmark");
    assert_eq!(peers.len(), 1, "{dump}");
    let b = &peers[0];
    assert_eq!(b.public_key, p.files[1].public_key, "{dump}");
    assert_eq!(b.preshared_key, "(none)");
    assert_eq!(b.endpoint, format!("{}:{PORT}", p.lab.sites()[1].wan_addr));
    assert_eq!(b.allowed_ips, "10.1.0.0/16");
    let now = now_secs();
    assert!(
        b.latest_handshake > now - 300 && b.latest_handshake <= now + 1,
        "handshake {} vs now {now}",
        b.latest_handshake
    );
    assert!(
        b.tx >= 4 << 20 && b.rx >= 1 << 20,
        "counters rx {} tx {}",
        b.rx,
        b.tx
    );
    assert_eq!(b.keepalive, "off");
    // The same counters as `causeway status`, read a moment earlier.
    let status = p.daemon(0).status();
    assert!(
        status.peers[0].tx_bytes >= b.tx && status.peers[0].rx_bytes >= b.rx,
        "{status:?} vs {b:?}"
    );

    // The human format, as an operator reads it.
    let (ok, show, err) = run_bounded(gw_a, "wg", &["show", &ifname], wg);
    assert!(ok, "wg show failed: {err}");
    for expected in [
        format!("interface: {ifname}"),
        format!("public key: {}", p.files[0].public_key),
        "private key: (hidden)".to_owned(),
        format!("listening port: {PORT}"),
        format!("peer: {}", p.files[1].public_key),
        format!("endpoint: {}:{PORT}", p.lab.sites()[1].wan_addr),
        "allowed ips: 10.1.0.0/16".to_owned(),
        "latest handshake: ".to_owned(),
        "transfer: ".to_owned(),
    ] {
        assert!(
            show.contains(&expected),
            "`wg show` lacks {expected:?}:\n{show}"
        );
    }
    let (ok, conf, err) = run_bounded(gw_a, "wg", &["showconf", &ifname], wg);
    assert!(ok, "wg showconf failed: {err}");
    assert!(
        conf.contains(&format!("PrivateKey = {}", private_key.trim())),
        "{conf}"
    );
    assert!(conf.contains("AllowedIPs = 10.1.0.0/16"), "{conf}");
    // `wg show` without an interface finds it among the host's sockets.
    let (ok, all, err) = run_bounded(gw_a, "wg", &["show", "interfaces"], wg);
    assert!(
        ok && all.split_whitespace().any(|i| i == ifname),
        "{all}{err}"
    );

    // `wg set` gets a clean refusal, whatever it asks, and changes nothing.
    for args in [
        vec![
            "set",
            ifname.as_str(),
            "peer",
            p.files[1].public_key.as_str(),
            "remove",
        ],
        vec!["set", ifname.as_str(), "listen-port", "4242"],
    ] {
        let (ok, _, err) = run_bounded(gw_a, "wg", &args, wg);
        assert!(!ok, "`wg {}` succeeded", args.join(" "));
        assert!(
            err.contains("Operation not permitted"),
            "`wg {}`: {err}",
            args.join(" ")
        );
    }
    assert!(
        p.daemon(0).log_text().contains("refused a `wg set`"),
        "{}",
        p.daemon(0).log_text()
    );

    // Garbage is answered with EINVAL and the connection closed; the daemon
    // carries on.
    let socket = format!("/var/run/wireguard/{ifname}.sock");
    assert_eq!(uapi_request(&socket, b"hello there\n\n"), "errno=-22\n\n");
    assert_eq!(uapi_request(&socket, b"get=1\ntrailing\n"), "errno=-22\n\n");
    assert_eq!(uapi_request(&socket, &[0xff; 300]), "errno=-22\n\n");
    let raw = uapi_request(&socket, b"get=1\n\nget=1\n\n");
    assert_eq!(raw.matches("errno=0\n\n").count(), 2, "{raw}");
    assert_ping(&pod_a.ns, pod_b.addr.into());
    let (ok, dump, _) = run_bounded(gw_a, "wg", &["show", &ifname, "dump"], wg);
    assert!(ok && parse_dump(&dump).1.len() == 1, "{dump}");

    // A crashed run leaves its socket; the next run replaces it.
    p.daemons[0]
        .as_mut()
        .expect("daemon a")
        .child
        .kill9()
        .expect("kill -9");
    assert!(
        Path::new(&socket).exists(),
        "the crashed run's socket should still be there"
    );
    p.daemons[0] = Some(Daemon::start(gw_a, &p.files[0], &p.configs[0]));
    let (ok, dump, err) = run_bounded(gw_a, "wg", &["show", &ifname, "dump"], wg);
    assert!(ok, "wg show after a restart: {err}");
    assert_eq!(parse_dump(&dump).1[0].public_key, p.files[1].public_key);

    // A clean stop removes it.
    p.daemons[0].take().expect("daemon a").stop();
    assert!(
        !Path::new(&socket).exists(),
        "socket left after a clean stop"
    );
}
