//! `causeway status`: the [`Status`] document, made from a
//! [`Snapshot`], its text rendering, and the control socket that serves it.
//!
//! The protocol is deliberately tiny: connect, send one request line
//! (`status`, or `role active` / `role standby` for `causeway ctl role`),
//! shut down writing, read the answer (one JSON document for `status`, one
//! line for the others), done. A client that sends nothing and just reads
//! gets the status too, after [`REQUEST_WAIT`]. The socket is root's and the daemon's user's only (see
//! [`super::unix`]). The JSON is a stable interface for scripts: fields
//! are added (with `#[serde(default)]`, so that this version's
//! `causeway status` still reads an older daemon), never renamed or
//! removed. Every field is documented in docs/status.md, which the
//! end-to-end test `tests/e2e/status.rs` checks a real daemon against.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tracing::info;

use crate::core::Role;
use crate::keys;

use super::snapshot::{DropCounts, LiveSite, Snapshot};
use super::unix::{Limits, UnixServer};

/// A snapshot of the daemon, as `causeway status --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The site name.
    pub site: String,
    /// The TUN interface.
    pub interface: String,
    /// The site's WireGuard public key.
    pub public_key: String,
    /// The UDP port WireGuard listens on.
    pub listen_port: u16,
    /// Whether both packet threads are running (false: the data path
    /// stopped and the daemon needs a restart).
    #[serde(default = "yes")]
    pub packet_threads_alive: bool,
    /// This gateway replica's role: `active` (carries the site's traffic)
    /// or `standby` (sends nothing; see `[failover]`).
    #[serde(default = "active")]
    pub role: Role,
    /// Drops not attributable to one peer, by reason (non-zero only).
    pub drops: BTreeMap<String, u64>,
    /// One entry per configured rendezvous, in config order.
    #[serde(default)]
    pub rendezvous: Vec<RendezvousStatus>,
    /// The external `ip:port` the gateway's router mapped to the WireGuard
    /// port over PCP or NAT-PMP, offered to peers as a candidate (`null`:
    /// no mapping).
    #[serde(default)]
    pub port_mapping: Option<String>,
    /// One entry per configured peer.
    pub peers: Vec<PeerStatus>,
}

fn yes() -> bool {
    true
}

fn active() -> Role {
    Role::Active
}

/// This site's connection to one rendezvous, in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RendezvousStatus {
    /// Its QUIC address, `ip:port`.
    pub server: String,
    /// Whether the site is connected and registered now.
    pub connected: bool,
    /// This site's address as the rendezvous last saw it (`null`: not yet).
    pub observed: Option<String>,
    /// While connected: `quic`, or `tcp` (TLS over TCP, because UDP to the
    /// rendezvous got no answer); `null` while not connected.
    #[serde(default)]
    pub transport: Option<String>,
    /// Connections established (1 + reconnects).
    pub connections: u64,
    /// WireGuard messages sent through its relay.
    pub relay_tx_packets: u64,
    /// Bytes of those messages.
    pub relay_tx_bytes: u64,
    /// Relay datagrams they took (more than messages when fragmented).
    pub relay_tx_datagrams: u64,
    /// WireGuard messages received whole through its relay.
    pub relay_rx_packets: u64,
    /// Bytes of those messages.
    pub relay_rx_bytes: u64,
    /// Messages dropped half-received (fragments missing).
    pub relay_incomplete: u64,
    /// Relay datagrams dropped as malformed or from an unknown peer.
    pub relay_malformed: u64,
    /// Messages received whole but dropped because the daemon did not
    /// take them fast enough.
    pub relay_rx_overflow: u64,
}

/// One peer in [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's name.
    pub name: String,
    /// Its WireGuard public key.
    pub public_key: String,
    /// How packets reach it: `static` (configured endpoint), `direct` (a
    /// path found by probing, or roaming), `relay` (through a rendezvous),
    /// or `none` (no endpoint, no relay).
    pub path: String,
    /// Where its packets go now (`null` until known, or when relayed).
    pub endpoint: Option<String>,
    /// On the `relay` path: the rendezvous' UDP relay port its packets go
    /// to (`null`: through the QUIC relay, or not relayed).
    #[serde(default)]
    pub relay_port: Option<String>,
    /// Its candidate addresses being probed (NAT traversal only).
    pub candidates: Vec<String>,
    /// Round-trip time to the peer in milliseconds: from path probes when
    /// the peer is found through a rendezvous, else measured by the last
    /// WireGuard handshake (`null` before one).
    pub rtt_ms: Option<f64>,
    /// WireGuard messages sent through the relay.
    pub relay_tx_packets: u64,
    /// WireGuard messages received through the relay.
    pub relay_rx_packets: u64,
    /// The networks it owns (its real CIDRs).
    pub cidrs: Vec<String>,
    /// How this site sees each of them: local pods reach the peer's
    /// `real` network at `view` (the same when no remapping was needed).
    pub views: Vec<ViewStatus>,
    /// Seconds since the last completed handshake (`null`: never).
    pub last_handshake_secs: Option<f64>,
    /// Unix time of the last completed handshake (`null`: never).
    #[serde(default)]
    pub last_handshake_unix: Option<f64>,
    /// WireGuard persistent keepalive interval, seconds (`null`: off).
    #[serde(default)]
    pub persistent_keepalive_secs: Option<u16>,
    /// Inner packets sent to the peer.
    pub tx_packets: u64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
    /// Inner packets received from the peer.
    pub rx_packets: u64,
    /// Inner bytes received from the peer.
    pub rx_bytes: u64,
    /// Dropped packets by reason (non-zero only).
    pub drops: BTreeMap<String, u64>,
}

/// One real CIDR of a peer and the view this site gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewStatus {
    /// The peer's own network.
    pub real: String,
    /// Where local pods reach it.
    pub view: String,
}

/// The non-zero counts, by reason name.
fn drops(counts: &DropCounts) -> BTreeMap<String, u64> {
    counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| (r.name().to_owned(), n))
        .collect()
}

impl Status {
    /// The status document of `snapshot`.
    pub(crate) fn of(snapshot: &Snapshot) -> Self {
        let site = &snapshot.site;
        Status {
            site: site.name.clone(),
            interface: site.interface.clone(),
            public_key: keys::encode_public(&site.public_key),
            listen_port: site.listen_port,
            packet_threads_alive: site.packet_threads_alive,
            role: site.role,
            drops: drops(&site.drops),
            port_mapping: site.port_mapping.map(|a| a.to_string()),
            rendezvous: site
                .rendezvous
                .iter()
                .map(|r| RendezvousStatus {
                    server: r.server.to_string(),
                    connected: r.connected,
                    observed: r.observed.map(|a| a.to_string()),
                    transport: r.transport.map(str::to_owned),
                    connections: r.stats.connections,
                    relay_tx_packets: r.stats.relay_tx_packets,
                    relay_tx_bytes: r.stats.relay_tx_bytes,
                    relay_tx_datagrams: r.stats.relay_tx_datagrams,
                    relay_rx_packets: r.stats.relay_rx_packets,
                    relay_rx_bytes: r.stats.relay_rx_bytes,
                    relay_incomplete: r.stats.relay_incomplete,
                    relay_malformed: r.stats.relay_malformed,
                    relay_rx_overflow: r.stats.events_dropped,
                })
                .collect(),
            peers: snapshot
                .peers
                .iter()
                .map(|p| PeerStatus {
                    name: p.name.clone(),
                    public_key: keys::encode_public(&p.public_key),
                    path: p.path.name().to_owned(),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    relay_port: p.relay_port.map(|e| e.to_string()),
                    candidates: p.candidates.iter().map(|c| c.to_string()).collect(),
                    rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1e3),
                    relay_tx_packets: p.relay_tx_packets,
                    relay_rx_packets: p.relay_rx_packets,
                    cidrs: p.views.iter().map(|v| v.real.to_string()).collect(),
                    views: p
                        .views
                        .iter()
                        .map(|v| ViewStatus {
                            real: v.real.to_string(),
                            view: v.view.to_string(),
                        })
                        .collect(),
                    last_handshake_secs: p.last_handshake.map(|h| h.age.as_secs_f64()),
                    last_handshake_unix: p.last_handshake.map(|h| {
                        h.at.duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64()
                    }),
                    persistent_keepalive_secs: p.persistent_keepalive,
                    tx_packets: p.tx_packets,
                    tx_bytes: p.tx_bytes,
                    rx_packets: p.rx_packets,
                    rx_bytes: p.rx_bytes,
                    drops: drops(&p.drops),
                })
                .collect(),
        }
    }

    /// Human-readable rendering for `causeway status`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "site {} on {}, port {}, key {}",
            self.site, self.interface, self.listen_port, self.public_key
        );
        if self.role == Role::Standby {
            let _ = writeln!(
                s,
                "  role: standby (another replica carries the traffic; this one sends nothing)"
            );
        }
        if !self.packet_threads_alive {
            let _ = writeln!(
                s,
                "  packet threads: STOPPED (no packets move; restart the daemon)"
            );
        }
        if !self.drops.is_empty() {
            let _ = writeln!(s, "  drops: {}", fmt_drops(&self.drops));
        }
        if let Some(mapped) = &self.port_mapping {
            let _ = writeln!(s, "  port mapping: {mapped} (by the gateway's router)");
        }
        for r in &self.rendezvous {
            let over = match r.transport.as_deref() {
                Some("tcp") => " over TLS on TCP (UDP gets no answer)",
                _ => "",
            };
            let state = match (&r.observed, r.connected) {
                (Some(seen), true) => format!("connected{over}, sees us at {seen}"),
                (None, true) => format!("connected{over}"),
                (_, false) => "not connected".to_owned(),
            };
            let _ = writeln!(
                s,
                "  rendezvous {}: {state} ({} connections)",
                r.server, r.connections
            );
            if r.relay_tx_packets + r.relay_rx_packets > 0 {
                let _ = writeln!(
                    s,
                    "    relayed: {} sent ({} datagrams, {} bytes), {} received ({} bytes)",
                    r.relay_tx_packets,
                    r.relay_tx_datagrams,
                    r.relay_tx_bytes,
                    r.relay_rx_packets,
                    r.relay_rx_bytes
                );
            }
            let dropped: BTreeMap<String, u64> = [
                ("incomplete", r.relay_incomplete),
                ("malformed", r.relay_malformed),
                ("overflow", r.relay_rx_overflow),
            ]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (k.to_owned(), n))
            .collect();
            if !dropped.is_empty() {
                let _ = writeln!(s, "    relay drops: {}", fmt_drops(&dropped));
            }
        }
        for p in &self.peers {
            let _ = writeln!(s, "peer {} ({})", p.name, p.public_key);
            let via = match (&p.relay_port, p.path.as_str()) {
                (Some(port), _) => format!("via UDP relay port {port}"),
                (None, "relay") => "via QUIC".to_owned(),
                (None, _) => p.endpoint.clone().unwrap_or_default(),
            };
            let _ = writeln!(s, "  path:      {} {via}", p.path);
            if let Some(rtt) = p.rtt_ms {
                let _ = writeln!(s, "  rtt:       {rtt:.2} ms");
            }
            if !p.candidates.is_empty() {
                let _ = writeln!(s, "  candidates: {}", p.candidates.join(", "));
            }
            if p.relay_tx_packets + p.relay_rx_packets > 0 {
                let _ = writeln!(
                    s,
                    "  relayed:   {} sent, {} received",
                    p.relay_tx_packets, p.relay_rx_packets
                );
            }
            let views: Vec<String> = p
                .views
                .iter()
                .map(|v| {
                    if v.real == v.view {
                        v.real.clone()
                    } else {
                        format!("{} (seen here as {})", v.real, v.view)
                    }
                })
                .collect();
            let _ = writeln!(s, "  cidrs:     {}", views.join(", "));
            let hs = p
                .last_handshake_secs
                .map_or("never".to_owned(), |t| format!("{t:.1} s ago"));
            let _ = writeln!(s, "  handshake: {hs}");
            if let Some(every) = p.persistent_keepalive_secs {
                let _ = writeln!(s, "  keepalive: every {every} s");
            }
            let _ = writeln!(
                s,
                "  sent:      {} packets, {} bytes",
                p.tx_packets, p.tx_bytes
            );
            let _ = writeln!(
                s,
                "  received:  {} packets, {} bytes",
                p.rx_packets, p.rx_bytes
            );
            if !p.drops.is_empty() {
                let _ = writeln!(s, "  drops:     {}", fmt_drops(&p.drops));
            }
        }
        s
    }
}

fn fmt_drops(drops: &BTreeMap<String, u64>) -> String {
    drops
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the control socket takes on.
const LIMITS: Limits = Limits {
    max_connections: 8,
    connection_timeout: Duration::from_secs(10),
};

/// Serves `causeway status` for `site` on the control socket at `path`:
/// each connection gets the status of a fresh snapshot as one JSON
/// document, then is closed.
pub(crate) async fn serve(
    path: &Path,
    site: LiveSite,
    roles: Option<watch::Sender<Role>>,
) -> io::Result<UnixServer> {
    serve_with(path, move || site.snapshot(SystemTime::now()), roles).await
}

/// How long the server waits for a request line before it takes the
/// connection for a plain status read.
const REQUEST_WAIT: Duration = Duration::from_millis(500);
/// The longest request line.
const MAX_REQUEST: usize = 64;

/// A request on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Status,
    Role(Role),
}

impl Request {
    fn parse(line: &str) -> Result<Request, String> {
        match line.trim() {
            "" | "status" => Ok(Request::Status),
            other => match other.strip_prefix("role ") {
                Some(role) => role.trim().parse().map(Request::Role),
                None => Err(format!("unknown request {other:?}")),
            },
        }
    }
}

/// Reads the request: up to a newline, the end of the client's writing,
/// [`MAX_REQUEST`] bytes or [`REQUEST_WAIT`], whichever comes first.
async fn read_request(conn: &mut UnixStream) -> Result<Request, String> {
    let mut buf = [0u8; MAX_REQUEST];
    let mut len = 0;
    let deadline = tokio::time::Instant::now() + REQUEST_WAIT;
    while len < buf.len() && !buf[..len].contains(&b'\n') {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf[len..])).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => len += n,
            Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        }
    }
    let line = std::str::from_utf8(&buf[..len]).map_err(|_| "request is not UTF-8".to_owned())?;
    Request::parse(line.split('\n').next().unwrap_or(""))
}

/// [`serve`] with any source of snapshots (tests).
pub(crate) async fn serve_with(
    path: &Path,
    snapshot: impl Fn() -> Snapshot + Send + Sync + 'static,
    roles: Option<watch::Sender<Role>>,
) -> io::Result<UnixServer> {
    let snapshot = Arc::new(snapshot);
    let roles = Arc::new(roles);
    let server = UnixServer::serve(path, "control", LIMITS, move |mut conn: UnixStream| {
        let snapshot = Arc::clone(&snapshot);
        let roles = Arc::clone(&roles);
        async move {
            let answer = match read_request(&mut conn).await {
                Ok(Request::Status) => serde_json::to_vec_pretty(&Status::of(&snapshot())).ok(),
                Ok(Request::Role(role)) => {
                    Some(set_role(roles.as_ref().as_ref(), role).into_bytes())
                }
                Err(e) => Some(format!("error: {e}\n").into_bytes()),
            };
            if let Some(answer) = answer {
                let _ = conn.write_all(&answer).await;
            }
        }
    })
    .await?;
    info!(path = %path.display(), "serving `causeway status` and `causeway ctl`");
    Ok(server)
}

/// Asks for `role`; the answer line for the client.
fn set_role(roles: Option<&watch::Sender<Role>>, role: Role) -> String {
    let Some(roles) = roles else {
        return "error: this site's role is not set by `causeway ctl role` \
                (its config has no `[failover] election = \"keepalived\"`)\n"
            .to_owned();
    };
    let was = roles.send_replace(role);
    info!(%role, was = %was, "role requested on the control socket");
    format!("ok: role {role} (was {was})\n")
}

/// Sends `request` to the daemon behind `path` and reads the whole answer.
async fn ask(path: &Path, request: &str) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    let mut conn = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach the daemon at {} (is `causeway up` running, and are you root?)",
            path.display()
        )
    })?;
    conn.write_all(format!("{request}\n").as_bytes())
        .await
        .context("sending the request")?;
    conn.shutdown().await.context("sending the request")?;
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf)
        .await
        .context("reading the answer")?;
    if buf.is_empty() {
        anyhow::bail!(
            "the daemon at {} closed the connection without answering (only root and the daemon's user may ask)",
            path.display()
        );
    }
    Ok(buf)
}

/// Asks the daemon behind `path` to take `role` (`causeway ctl role`).
/// Returns the daemon's answer line; an error when it refused.
pub async fn request_role(path: &Path, role: Role) -> anyhow::Result<String> {
    let answer = ask(path, &format!("role {role}")).await?;
    let line = String::from_utf8_lossy(&answer).trim().to_owned();
    match line.strip_prefix("error: ") {
        Some(e) => anyhow::bail!("the daemon refused: {e}"),
        None => Ok(line),
    }
}

/// Asks the daemon behind `path` for its status.
pub async fn query(path: &Path) -> anyhow::Result<Status> {
    use anyhow::Context as _;
    let buf = ask(path, "status").await?;
    serde_json::from_slice(&buf).context("daemon sent a status this version does not understand")
}

#[cfg(test)]
mod tests {
    use super::super::snapshot;
    use super::*;

    #[test]
    fn control_requests() {
        assert_eq!(Request::parse(""), Ok(Request::Status));
        assert_eq!(Request::parse("status\n"), Ok(Request::Status));
        assert_eq!(
            Request::parse("role active"),
            Ok(Request::Role(Role::Active))
        );
        assert_eq!(
            Request::parse("role  standby "),
            Ok(Request::Role(Role::Standby))
        );
        assert!(
            Request::parse("role leader")
                .unwrap_err()
                .contains("unknown role")
        );
        assert!(
            Request::parse("reboot")
                .unwrap_err()
                .contains("unknown request")
        );
        let (roles, seen) = watch::channel(Role::Standby);
        assert_eq!(
            set_role(Some(&roles), Role::Active),
            "ok: role active (was standby)\n"
        );
        assert_eq!(*seen.borrow(), Role::Active);
        assert!(set_role(None, Role::Active).starts_with("error: "));
    }

    #[test]
    fn status_of_the_example() {
        let s = Status::of(&snapshot::example());
        let key = |b: u8| keys::encode_public(&x25519_dalek::PublicKey::from([b; 32]));
        assert_eq!(
            (s.site.as_str(), s.interface.as_str(), s.listen_port),
            ("a", "causeway0", 51820)
        );
        assert_eq!(s.public_key, key(0xaa));
        assert!(s.packet_threads_alive);
        // Only non-zero drops.
        assert_eq!(s.drops, BTreeMap::from([("malformed".to_owned(), 400)]));
        assert_eq!(
            s.rendezvous,
            [RendezvousStatus {
                server: "192.0.2.9:4433".into(),
                connected: true,
                observed: Some("198.51.100.1:51820".into()),
                transport: Some("quic".into()),
                connections: 4,
                relay_tx_packets: 11,
                relay_tx_bytes: 1100,
                relay_tx_datagrams: 13,
                relay_rx_packets: 12,
                relay_rx_bytes: 1200,
                relay_incomplete: 1,
                relay_malformed: 2,
                relay_rx_overflow: 3,
            }]
        );
        let [b, c, d] = &s.peers[..] else {
            panic!("three peers: {s:?}");
        };
        assert_eq!(
            (b.name.as_str(), b.public_key.clone(), b.path.as_str()),
            ("b", key(0xbb), "static")
        );
        assert_eq!(b.endpoint.as_deref(), Some("192.0.2.2:51820"));
        assert_eq!(b.rtt_ms, Some(1.5));
        assert_eq!(b.last_handshake_secs, Some(3.2));
        assert_eq!(b.last_handshake_unix, Some(1_700_000_000.5));
        assert_eq!(b.persistent_keepalive_secs, Some(25));
        assert_eq!(
            (b.tx_packets, b.tx_bytes, b.rx_packets, b.rx_bytes),
            (10, 1000, 20, 2000)
        );
        assert_eq!(b.cidrs, ["10.1.0.0/16", "fd00:1::/64"]);
        assert_eq!(
            b.drops,
            BTreeMap::from([
                ("policy_port".to_owned(), 2),
                ("spoofed_source".to_owned(), 5)
            ])
        );
        assert_eq!((c.path.as_str(), c.endpoint.as_deref()), ("relay", None));
        assert_eq!(c.candidates, ["203.0.113.7:40000"]);
        assert_eq!((c.relay_tx_packets, c.relay_rx_packets), (7, 8));
        assert_eq!(c.cidrs, ["10.0.0.0/16"]);
        assert_eq!(
            c.views,
            [ViewStatus {
                real: "10.0.0.0/16".into(),
                view: "100.64.0.0/16".into()
            }]
        );
        assert_eq!(c.persistent_keepalive_secs, None);
        // Nothing known yet: nulls, not zeros.
        assert_eq!(d.path, "none");
        assert_eq!(
            (
                d.endpoint.as_deref(),
                d.rtt_ms,
                d.last_handshake_secs,
                d.last_handshake_unix
            ),
            (None, None, None, None)
        );
        assert!(d.drops.is_empty() && d.cidrs.is_empty() && d.views.is_empty());

        // What goes on the socket comes back the same.
        let json = serde_json::to_string_pretty(&s).expect("json");
        let back: Status = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, s);
        let value: serde_json::Value = serde_json::from_str(&json).expect("value");
        assert_eq!(value["peers"][2]["rtt_ms"], serde_json::Value::Null);
        assert_eq!(value["packet_threads_alive"], true);
    }

    /// This version's `causeway status` reads a daemon that does not send
    /// the fields added since.
    #[test]
    fn documents_of_older_daemons_still_parse() {
        let old = r#"{"site":"a","interface":"causeway0","public_key":"k","listen_port":1,
            "drops":{},"peers":[{"name":"b","public_key":"k","path":"none","endpoint":null,
            "candidates":[],"rtt_ms":null,"relay_tx_packets":0,"relay_rx_packets":0,
            "cidrs":[],"views":[],"last_handshake_secs":null,"tx_packets":0,"tx_bytes":0,
            "rx_packets":0,"rx_bytes":0,"drops":{}}]}"#;
        let s: Status = serde_json::from_str(old).expect("old document");
        assert!(s.packet_threads_alive && s.rendezvous.is_empty());
        assert_eq!(s.peers[0].last_handshake_unix, None);
        assert_eq!(s.peers[0].persistent_keepalive_secs, None);
    }

    #[test]
    fn text_says_when_the_rendezvous_is_reached_over_tcp() {
        let mut snap = snapshot::example();
        snap.site.rendezvous[0].transport = Some("tcp");
        let status = Status::of(&snap);
        assert_eq!(status.rendezvous[0].transport.as_deref(), Some("tcp"));
        assert!(status.render().contains(
            "  rendezvous 192.0.2.9:4433: connected over TLS on TCP (UDP gets no answer), sees us at 198.51.100.1:51820 (4 connections)\n"
        ));
    }

    #[test]
    fn text_shows_the_site_its_rendezvous_and_every_peer() {
        let mut snap = snapshot::example();
        snap.site.packet_threads_alive = false;
        let text = Status::of(&snap).render();
        let key = |b: u8| keys::encode_public(&x25519_dalek::PublicKey::from([b; 32]));
        for line in [
            format!("site a on causeway0, port 51820, key {}\n", key(0xaa)),
            "  packet threads: STOPPED".to_owned(),
            "  drops: malformed=400\n".to_owned(),
            "  rendezvous 192.0.2.9:4433: connected, sees us at 198.51.100.1:51820 (4 connections)\n"
                .to_owned(),
            "    relayed: 11 sent (13 datagrams, 1100 bytes), 12 received (1200 bytes)\n".to_owned(),
            "    relay drops: incomplete=1 malformed=2 overflow=3\n".to_owned(),
            format!("peer b ({})\n  path:      static 192.0.2.2:51820\n  rtt:       1.50 ms\n", key(0xbb)),
            "  cidrs:     10.1.0.0/16, fd00:1::/64\n  handshake: 3.2 s ago\n  keepalive: every 25 s\n"
                .to_owned(),
            "  sent:      10 packets, 1000 bytes\n  received:  20 packets, 2000 bytes\n".to_owned(),
            "  drops:     policy_port=2 spoofed_source=5\n".to_owned(),
            format!("peer c ({})\n  path:      relay via QUIC\n", key(0xcc)),
            "  candidates: 203.0.113.7:40000\n  relayed:   7 sent, 8 received\n".to_owned(),
            "  cidrs:     10.0.0.0/16 (seen here as 100.64.0.0/16)\n".to_owned(),
            format!("peer d-\"quoted\" ({})\n  path:      none \n", key(0x01)),
            "  handshake: never\n".to_owned(),
        ] {
            assert!(text.contains(&line), "{line:?} not in\n{text}");
        }
        assert!(text.starts_with("site a on causeway0"), "{text}");
        snap.peers[1].relay_port = Some("192.0.2.9:40001".parse().expect("addr"));
        let text = Status::of(&snap).render();
        let line = "  path:      relay via UDP relay port 192.0.2.9:40001\n";
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }
}
