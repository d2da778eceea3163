//! Interop: our STUN client codec against a stock STUN server (coturn, the
//! Debian `coturn` package) running in the lab's internet namespace. Needs
//! root (network namespaces).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use causeway_nat::stun::{self, StunMessage, TransactionId};
use causeway_testbed::{ChildGuard, Lab, LabSpec, Nat, Netns, SiteSpec};

const STUN_PORT: u16 = 3478;

fn start_coturn(ns: &Netns, ip: IpAddr, dir: &Path) -> ChildGuard {
    // Only the STUN part: no TURN relay, no TLS, no CLI, no config file.
    let mut cmd = ns.command("turnserver");
    cmd.args([
        "--stun-only",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "-n",
        "--log-file",
        "stdout",
    ])
    .args(["-L", &ip.to_string(), "-p", &STUN_PORT.to_string()])
    .arg("--pidfile")
    .arg(dir.join("turnserver.pid"))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    ns.spawn(&mut cmd)
        .expect("start turnserver (apt-get install coturn)")
}

/// Asks `server` for our reflexive address from a socket bound to
/// `local_port`, retrying until coturn is up.
fn binding(ns: &Netns, local_port: u16, server: SocketAddr) -> SocketAddr {
    let socket = ns.enter(|| UdpSocket::bind(("0.0.0.0", local_port)).expect("bind"));
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rng = rand::thread_rng();
    while Instant::now() < deadline {
        let tx = TransactionId::random(&mut rng);
        let mut buf = [0u8; 128];
        let n = stun::encode_binding_request(&tx, &mut buf);
        socket.send_to(&buf[..n], server).expect("send");
        let mut reply = [0u8; 512];
        if let Ok((n, from)) = socket.recv_from(&mut reply) {
            assert_eq!(from, server);
            assert!(
                stun::is_stun(&reply[..n]),
                "not recognised as STUN: {:02x?}",
                &reply[..n]
            );
            match stun::parse(&reply[..n]).expect("coturn's answer parses") {
                StunMessage::BindingSuccess { tx: got, mapped } => {
                    assert_eq!(got.0, tx.0, "transaction id");
                    return mapped;
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    panic!("no STUN answer from coturn at {server}");
}

#[test]
fn coturn_reflects_our_address_directly_and_through_a_nat() {
    let lab = Lab::build(&LabSpec {
        sites: vec![
            SiteSpec::new("open", vec!["10.0.0.0/16".parse().expect("cidr")]),
            SiteSpec::new("natted", vec!["10.1.0.0/16".parse().expect("cidr")])
                .nat(Nat::PortPreserving),
        ],
    })
    .expect("lab");
    let dir = tempfile::tempdir().expect("tempdir");
    let server_ip = IpAddr::V4(lab.internet_addr());
    let _coturn = start_coturn(lab.internet(), server_ip, dir.path());
    let server = SocketAddr::new(server_ip, STUN_PORT);

    let open = lab.site("open");
    assert_eq!(
        binding(&open.gateway, 40_000, server),
        SocketAddr::new(open.wan_addr, 40_000)
    );

    let natted = lab.site("natted");
    let mapped = binding(&natted.gateway, 40_001, server);
    assert_eq!(mapped.ip(), natted.public_addr, "the NAT's outside address");
    assert_eq!(mapped.port(), 40_001, "masquerade keeps a free source port");
}
