//! What `/metrics` holds (the Prometheus text format 0.0.4,
//! prometheus-client), for the site daemon ([`serve`], `causeway up`) and
//! for the rendezvous ([`serve_rendezvous`], `causeway rendezvous
//! --metrics-listen`). The HTTP server and the health endpoints are
//! [`super::http`]'s.
//!
//! Served only when `[site] metrics_listen` (or `--metrics-listen`) is set
//! (off by default: nothing listens unless the operator asks;
//! `127.0.0.1:9469` for a local agent, or the node's or pod's address for a
//! cluster's Prometheus and the kubelet's probes).
//!
//! Every value is read at scrape time (a [`Collector`]): the site's from one
//! [`Snapshot`], the same kind `causeway status` and `wg show` render, so
//! the data path keeps its counters as it always does and pays nothing for
//! metrics. The site's series:
//!
//! | series | type | labels |
//! |---|---|---|
//! | `causeway_build_info` | gauge (1) | `version` |
//! | `causeway_site_info` | gauge (1) | `site`, `interface`, `public_key` |
//! | `causeway_packet_threads_alive` | gauge (1: both packet threads run, 0: the data path stopped) | |
//! | `causeway_gateway_active` | gauge (1: this replica is the site's active gateway, 0: a standby) | |
//! | `causeway_peers_configured` | gauge | |
//! | `causeway_peer_info` | gauge (1) | `peer`, `public_key` |
//! | `causeway_peer_tx_bytes_total`, `causeway_peer_rx_bytes_total` | counter | `peer` |
//! | `causeway_peer_tx_packets_total`, `causeway_peer_rx_packets_total` | counter | `peer` |
//! | `causeway_peer_relay_tx_packets_total`, `causeway_peer_relay_rx_packets_total` | counter | `peer` |
//! | `causeway_peer_last_handshake_timestamp_seconds` | gauge (0: never) | `peer` |
//! | `causeway_peer_path` | gauge (1 for the current path, 0 for the others) | `peer`, `path` (`static`, `direct`, `relay`, `none`) |
//! | `causeway_peer_rtt_seconds` | gauge (absent until known) | `peer` |
//! | `causeway_peer_drops_total` | counter | `peer`, `reason` |
//! | `causeway_site_drops_total` | counter | `reason` |
//! | `causeway_rendezvous_client_connected` | gauge (1: connected and registered, 0: not) | `rendezvous` |
//! | `causeway_rendezvous_client_over_tcp` | gauge (1: connected over TLS on TCP, UDP gets no answer; 0: QUIC or not connected) | `rendezvous` |
//! | `causeway_rendezvous_client_connections_total` | counter | `rendezvous` |
//! | `causeway_rendezvous_client_relay_tx_packets_total`, `causeway_rendezvous_client_relay_tx_bytes_total`, `causeway_rendezvous_client_relay_tx_datagrams_total` | counter | `rendezvous` |
//! | `causeway_rendezvous_client_relay_rx_packets_total`, `causeway_rendezvous_client_relay_rx_bytes_total` | counter | `rendezvous` |
//! | `causeway_rendezvous_client_relay_incomplete_total`, `causeway_rendezvous_client_relay_malformed_total`, `causeway_rendezvous_client_relay_rx_overflow_total` | counter | `rendezvous` |
//! | `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`, `process_start_time_seconds` | | |
//!
//! Bytes and packets are inner (plaintext) ones, as in `causeway status`;
//! the relay counters count WireGuard messages (data, handshakes,
//! keepalives). The RTT is the one `causeway status` shows (path probes on
//! a direct path, else the last handshake this site initiated). Every drop
//! reason is exported for every peer, zeros included, and every path value
//! for every peer, so that `rate()` and alerts work from the first scrape.
//! A handshake older than three minutes means the peer is down:
//! `time() - causeway_peer_last_handshake_timestamp_seconds > 180`; a
//! relayed peer: `causeway_peer_path{path="relay"} == 1`.
//!
//! `rendezvous` is the rendezvous' QUIC address (`ip:port`), one per
//! `[[rendezvous]]` of the site's config; its relay counters are the
//! site's side of the relay: WireGuard messages sent (and the datagrams
//! they took, more when fragmented) and received whole, messages dropped
//! half-received (`incomplete`), datagrams dropped as malformed or from an
//! unknown peer, and messages dropped because the daemon did not take them
//! fast enough (`rx_overflow`).
//!
//! The rendezvous' series (with `causeway_build_info` and the `process_*`
//! series as above):
//!
//! | series | type | labels |
//! |---|---|---|
//! | `causeway_rendezvous_sites_configured` | gauge | |
//! | `causeway_rendezvous_site_connected` | gauge (1: connected and authenticated, 0: not) | `site` |
//! | `causeway_rendezvous_site_over_tcp` | gauge (1: connected over TLS on TCP, 0: QUIC or not connected) | `site` |
//! | `causeway_rendezvous_relay_rx_packets_total` | counter | `site` |
//! | `causeway_rendezvous_relay_rx_bytes_total` | counter | `site` |
//! | `causeway_rendezvous_relay_dropped_total` | counter | `site` |
//! | `causeway_rendezvous_stun_answered_total` | counter | |
//! | `causeway_rendezvous_pending_auth` | gauge | |
//! | `causeway_rendezvous_abuse_total` | counter | `what` |
//!
//! `site` is the name in the rendezvous' `[[site]]` table; every configured
//! site is exported, connected or not. Relay counters count what the site
//! sent: WireGuard packets (once however many fragments they took) and their
//! bytes (relay headers excluded), and relay datagrams from it that were
//! dropped (not addressed to a connected mutual peer, or malformed). A site
//! that should be up: `causeway_rendezvous_site_connected == 0`.
//!
//! The `process_*` series carry the standard names of Prometheus' client
//! libraries (no `causeway_` prefix), so that existing dashboards work.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{SystemTime, UNIX_EPOCH};

use causeway_nat::rendezvous::{AbuseCounters, ClientStats, ServerStats, SiteStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::keys;

use super::http::{MetricsServer, bind, serve_on};
use super::snapshot::{LiveSite, PathKind, PeerSnapshot, Snapshot};

/// Serves `/metrics` for `site`, `/healthz` (200 while both packet threads
/// run) and `/readyz` (200 only while `ready` is true and the packet threads
/// run) on `addr`.
pub(crate) async fn serve(
    addr: SocketAddr,
    site: LiveSite,
    ready: Arc<AtomicBool>,
) -> io::Result<MetricsServer> {
    let listener = bind(addr).await?;
    let alive = site.clone();
    serve_on(
        listener,
        registry(move || site.snapshot(SystemTime::now())),
        ready,
        move || alive.alive(),
    )
}

/// Serves `/metrics` for a rendezvous (read from `stats` at each scrape),
/// `/healthz`, and `/readyz` (200 only while `ready` is true: the caller
/// sets it once the rendezvous' sockets are bound and clears it when it
/// shuts down) on `addr`.
pub async fn serve_rendezvous(
    addr: SocketAddr,
    stats: ServerStats,
    ready: Arc<AtomicBool>,
) -> io::Result<MetricsServer> {
    let listener = bind(addr).await?;
    serve_on(
        listener,
        rendezvous_registry(move || RendezvousSample::collect(&stats)),
        ready,
        // The rendezvous has no threads of its own: answering is its health.
        || true,
    )
}

/// The registry: process metrics, and the site's under `causeway_`.
fn registry(snapshot: impl Fn() -> Snapshot + Send + Sync + 'static) -> Registry {
    registry_of(SiteCollector {
        snapshot: Box::new(snapshot),
    })
}

/// The registry of a rendezvous: process metrics, and its own under
/// `causeway_`.
fn rendezvous_registry(sample: impl Fn() -> RendezvousSample + Send + Sync + 'static) -> Registry {
    registry_of(RendezvousCollector {
        sample: Box::new(sample),
    })
}

/// Process metrics, and `collector`'s series under `causeway_`.
fn registry_of(collector: impl Collector + 'static) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector));
    registry
        .sub_registry_with_prefix("causeway")
        .register_collector(Box::new(collector));
    registry
}

/// The site's series, computed from a snapshot at each scrape.
struct SiteCollector {
    snapshot: Box<dyn Fn() -> Snapshot + Send + Sync>,
}

impl fmt::Debug for SiteCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SiteCollector")
    }
}

impl Collector for SiteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        encode_site(&(self.snapshot)(), &mut encoder)
    }
}

/// Seconds since the Unix epoch.
fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The site's series of `snapshot`.
fn encode_site(snapshot: &Snapshot, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let site = &snapshot.site;
    let peers = &snapshot.peers;
    build_info(encoder)?;
    let public_key = keys::encode_public(&site.public_key);
    let mut family = encoder.encode_descriptor(
        "site_info",
        "The site, its interface and its WireGuard public key",
        None,
        MetricType::Gauge,
    )?;
    let labels = [
        ("site", site.name.as_str()),
        ("interface", site.interface.as_str()),
        ("public_key", public_key.as_str()),
    ];
    ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
    gauge(
        encoder,
        "packet_threads_alive",
        "Whether both packet threads are running (1) or the data path stopped (0)",
        i64::from(site.packet_threads_alive),
    )?;
    gauge(
        encoder,
        "gateway_active",
        "Whether this replica is the site's active gateway (1) or a standby (0)",
        i64::from(site.role == crate::core::Role::Active),
    )?;
    gauge(
        encoder,
        "peers_configured",
        "Peers in the running config",
        peers.len() as i64,
    )?;

    let mut info = encoder.encode_descriptor(
        "peer_info",
        "A configured peer and its WireGuard public key",
        None,
        MetricType::Gauge,
    )?;
    for p in peers {
        let key = keys::encode_public(&p.public_key);
        let labels = [("peer", p.name.as_str()), ("public_key", key.as_str())];
        ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
    }
    type Value = fn(&PeerSnapshot) -> u64;
    let per_peer: [(&str, &str, Value); 6] = [
        (
            "peer_tx_bytes",
            "Bytes of inner packets sent to the peer",
            |p| p.tx_bytes,
        ),
        (
            "peer_rx_bytes",
            "Bytes of inner packets received from the peer",
            |p| p.rx_bytes,
        ),
        ("peer_tx_packets", "Inner packets sent to the peer", |p| {
            p.tx_packets
        }),
        (
            "peer_rx_packets",
            "Inner packets received from the peer and delivered",
            |p| p.rx_packets,
        ),
        (
            "peer_relay_tx_packets",
            "WireGuard messages sent to the peer through a rendezvous' relay",
            |p| p.relay_tx_packets,
        ),
        (
            "peer_relay_rx_packets",
            "WireGuard messages received from the peer through a rendezvous' relay",
            |p| p.relay_rx_packets,
        ),
    ];
    for (name, help, value) in per_peer {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for p in peers {
            ConstCounter::new(value(p))
                .encode(family.encode_family(&[("peer", p.name.as_str())])?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "peer_last_handshake_timestamp_seconds",
        "Unix time of the last completed WireGuard handshake with the peer (0: none yet)",
        None,
        MetricType::Gauge,
    )?;
    for p in peers {
        let at = p.last_handshake.map_or(0.0, |h| unix_seconds(h.at));
        ConstGauge::new(at).encode(family.encode_family(&[("peer", p.name.as_str())])?)?;
    }
    let mut family = encoder.encode_descriptor(
        "peer_path",
        "How packets reach the peer: 1 for the current path (static, direct, relay or none), 0 for the others",
        None,
        MetricType::Gauge,
    )?;
    for p in peers {
        for path in PathKind::ALL {
            let labels = [("peer", p.name.as_str()), ("path", path.name())];
            ConstGauge::new(i64::from(p.path == path)).encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "peer_rtt_seconds",
        "Round-trip time to the peer: path probes on a direct path, else the last handshake this site initiated (absent until known)",
        None,
        MetricType::Gauge,
    )?;
    for p in peers {
        if let Some(rtt) = p.rtt {
            ConstGauge::new(rtt.as_secs_f64())
                .encode(family.encode_family(&[("peer", p.name.as_str())])?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "peer_drops",
        "Packets to or from the peer that were dropped, by reason",
        None,
        MetricType::Counter,
    )?;
    for p in peers {
        for (reason, n) in p.drops.iter() {
            let labels = [("peer", p.name.as_str()), ("reason", reason.name())];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "site_drops",
        "Packets dropped before a peer was known (not WireGuard, unknown key, no route), by reason",
        None,
        MetricType::Counter,
    )?;
    for (reason, n) in site.drops.iter() {
        ConstCounter::new(n).encode(family.encode_family(&[("reason", reason.name())])?)?;
    }
    encode_rendezvous_clients(snapshot, encoder)
}

/// The `causeway_rendezvous_client_*` series: the site's side of each
/// rendezvous.
fn encode_rendezvous_clients(
    snapshot: &Snapshot,
    encoder: &mut DescriptorEncoder<'_>,
) -> fmt::Result {
    let clients: Vec<(String, &_)> = snapshot
        .site
        .rendezvous
        .iter()
        .map(|r| (r.server.to_string(), r))
        .collect();
    let mut family = encoder.encode_descriptor(
        "rendezvous_client_connected",
        "Whether the site is connected and registered to the rendezvous now (1) or not (0)",
        None,
        MetricType::Gauge,
    )?;
    for (server, r) in &clients {
        ConstGauge::new(i64::from(r.connected))
            .encode(family.encode_family(&[("rendezvous", server.as_str())])?)?;
    }
    let mut family = encoder.encode_descriptor(
        "rendezvous_client_over_tcp",
        "Whether the site reaches the rendezvous over TLS on TCP now, because UDP to it gets no answer (1), or not (0)",
        None,
        MetricType::Gauge,
    )?;
    for (server, r) in &clients {
        ConstGauge::new(i64::from(r.transport == Some("tcp")))
            .encode(family.encode_family(&[("rendezvous", server.as_str())])?)?;
    }
    type Value = fn(&ClientStats) -> u64;
    let counters: [(&str, &str, Value); 9] = [
        (
            "rendezvous_client_connections",
            "Connections to the rendezvous established (1 + reconnects)",
            |s| s.connections,
        ),
        (
            "rendezvous_client_relay_tx_packets",
            "WireGuard messages sent through the rendezvous' relay",
            |s| s.relay_tx_packets,
        ),
        (
            "rendezvous_client_relay_tx_bytes",
            "Bytes of WireGuard messages sent through the relay",
            |s| s.relay_tx_bytes,
        ),
        (
            "rendezvous_client_relay_tx_datagrams",
            "Relay datagrams sent (more than messages when fragmented)",
            |s| s.relay_tx_datagrams,
        ),
        (
            "rendezvous_client_relay_rx_packets",
            "WireGuard messages received whole through the relay",
            |s| s.relay_rx_packets,
        ),
        (
            "rendezvous_client_relay_rx_bytes",
            "Bytes of WireGuard messages received through the relay",
            |s| s.relay_rx_bytes,
        ),
        (
            "rendezvous_client_relay_incomplete",
            "Relayed messages dropped half-received (fragments missing)",
            |s| s.relay_incomplete,
        ),
        (
            "rendezvous_client_relay_malformed",
            "Relay datagrams dropped as malformed or from an unknown peer",
            |s| s.relay_malformed,
        ),
        (
            "rendezvous_client_relay_rx_overflow",
            "Relayed messages dropped because the daemon did not take them fast enough",
            |s| s.events_dropped,
        ),
    ];
    for (name, help, value) in counters {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (server, r) in &clients {
            ConstCounter::new(value(&r.stats))
                .encode(family.encode_family(&[("rendezvous", server.as_str())])?)?;
        }
    }
    Ok(())
}

/// `causeway_build_info{version}` (the prefix comes from the registry).
fn build_info(encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
    let build = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
    build.encode(encoder.encode_descriptor(
        "build",
        "Causeway's version",
        None,
        build.metric_type(),
    )?)
}

/// A rendezvous' state at one scrape.
struct RendezvousSample {
    /// Every configured site, sorted by name.
    sites: Vec<SiteStats>,
    /// STUN Binding requests answered.
    stun_answered: u64,
    /// Connections authenticating now.
    pending_auth: usize,
    /// What was refused or dropped from clients.
    abuse: AbuseCounters,
}

impl RendezvousSample {
    fn collect(stats: &ServerStats) -> Self {
        RendezvousSample {
            sites: stats.sites(),
            stun_answered: stats.stun_answered(),
            pending_auth: stats.pending_auth(),
            abuse: stats.abuse(),
        }
    }
}

/// The rendezvous' series, computed at each scrape.
struct RendezvousCollector {
    sample: Box<dyn Fn() -> RendezvousSample + Send + Sync>,
}

impl fmt::Debug for RendezvousCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RendezvousCollector")
    }
}

impl Collector for RendezvousCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let rendezvous = (self.sample)();
        build_info(&mut encoder)?;
        gauge(
            &mut encoder,
            "rendezvous_sites_configured",
            "Sites in the rendezvous' config",
            rendezvous.sites.len() as i64,
        )?;
        let mut family = encoder.encode_descriptor(
            "rendezvous_site_connected",
            "Whether the site is connected and authenticated now (1) or not (0)",
            None,
            MetricType::Gauge,
        )?;
        for s in &rendezvous.sites {
            ConstGauge::new(i64::from(s.connected))
                .encode(family.encode_family(&[("site", s.name.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "rendezvous_site_over_tcp",
            "Whether the site is connected over TLS on TCP now (1), not QUIC or not connected (0)",
            None,
            MetricType::Gauge,
        )?;
        for s in &rendezvous.sites {
            ConstGauge::new(i64::from(s.over_tcp))
                .encode(family.encode_family(&[("site", s.name.as_str())])?)?;
        }
        type Value = fn(&SiteStats) -> u64;
        let per_site: [(&str, &str, Value); 3] = [
            (
                "rendezvous_relay_rx_packets",
                "WireGuard packets relayed from the site (once however many fragments they took)",
                |s| s.relay_rx_packets,
            ),
            (
                "rendezvous_relay_rx_bytes",
                "Bytes of WireGuard packets relayed from the site (relay headers excluded)",
                |s| s.relay_rx_bytes,
            ),
            (
                "rendezvous_relay_dropped",
                "Relay datagrams from the site that were dropped (no connected mutual peer, or malformed)",
                |s| s.relay_dropped,
            ),
        ];
        for (name, help, value) in per_site {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &rendezvous.sites {
                ConstCounter::new(value(s))
                    .encode(family.encode_family(&[("site", s.name.as_str())])?)?;
            }
        }
        let stun = ConstCounter::new(rendezvous.stun_answered);
        stun.encode(encoder.encode_descriptor(
            "rendezvous_stun_answered",
            "STUN Binding requests answered",
            None,
            stun.metric_type(),
        )?)?;
        gauge(
            &mut encoder,
            "rendezvous_pending_auth",
            "Connections authenticating now",
            rendezvous.pending_auth as i64,
        )?;
        let a = &rendezvous.abuse;
        let mut family = encoder.encode_descriptor(
            "rendezvous_abuse",
            "What the rendezvous refused, dropped or coalesced from clients",
            None,
            MetricType::Counter,
        )?;
        for (what, n) in [
            ("refused", a.refused),
            ("retried", a.retried),
            ("auth_timeouts", a.auth_timeouts),
            ("auth_failures", a.auth_failures),
            ("unauthenticated_datagrams", a.unauthenticated_datagrams),
            ("registrations_coalesced", a.registrations_coalesced),
            (
                "registration_entries_dropped",
                a.registration_entries_dropped,
            ),
            ("updates_coalesced", a.updates_coalesced),
            ("relay_strangers", a.relay_strangers),
        ] {
            ConstCounter::new(n).encode(family.encode_family(&[("what", what)])?)?;
        }
        Ok(())
    }
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: N,
) -> fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

/// The standard `process_*` series, from `/proc/self`.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(p) = ProcessSample::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(p.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident_bytes,
        )?;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_bytes,
        )?;
        if let Some(start) = p.start_time {
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                start,
            )?;
        }
        if let Some(fds) = p.open_fds {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                fds,
            )?;
        }
        if let Some(max) = p.max_fds {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        Ok(())
    }
}

/// What `/proc` says about this process.
#[derive(Debug, PartialEq)]
struct ProcessSample {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time: Option<f64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

/// The fields of `/proc/<pid>/stat` that the metrics use.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Clock ticks after boot.
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

impl ProcessSample {
    fn read() -> Option<Self> {
        let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        let page = if page > 0 { page as u64 } else { 4096 };
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_boot_time(&s));
        Some(ProcessSample {
            cpu_seconds: stat.cpu_ticks as f64 / ticks,
            resident_bytes: stat.resident_pages * page,
            virtual_bytes: stat.virtual_bytes,
            start_time: boot.map(|boot| boot as f64 + stat.start_ticks as f64 / ticks),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as u64),
            max_fds: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|s| parse_max_fds(&s)),
        })
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may contain
/// spaces and parentheses, so fields are counted from its last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest[0] is field 3 (state).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// `btime` of `/proc/stat`: boot time, Unix seconds.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft "Max open files" limit of `/proc/<pid>/limits`.
fn parse_max_fds(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::http::tests::{get, http};
    use super::super::snapshot::{self, N_REASONS};
    use super::*;
    use crate::core::DropReason;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tokio::net::TcpListener;

    /// Parses the text format into `series{labels} → value`, checking that
    /// every sample follows its `# HELP` and `# TYPE` lines.
    pub(crate) fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut series = BTreeMap::new();
        let mut typed = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                typed = name.to_owned();
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').expect("sample");
            let name = key.split('{').next().expect("name");
            assert_eq!(name, typed, "sample without its TYPE line: {line}");
            assert!(
                series
                    .insert(key.to_owned(), value.parse().expect("value"))
                    .is_none(),
                "duplicate {key}"
            );
        }
        series
    }

    pub(crate) fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, registry).expect("encode");
        text
    }

    /// The `causeway_` series names in `series`.
    fn names(series: &BTreeMap<String, f64>) -> Vec<&str> {
        let names: BTreeSet<&str> = series
            .keys()
            .filter(|k| k.starts_with("causeway_"))
            .filter_map(|k| k.split('{').next())
            .collect();
        names.into_iter().collect()
    }

    /// The exposition of the example snapshot.
    pub(crate) fn site_exposition() -> String {
        encode(&registry(snapshot::example))
    }

    #[test]
    fn exposition_has_every_series() {
        let text = site_exposition();
        let series = parse(&text);
        let get = |key: &str| {
            *series
                .get(key)
                .unwrap_or_else(|| panic!("no {key} in\n{text}"))
        };
        let key = |b: u8| keys::encode_public(&x25519_dalek::PublicKey::from([b; 32]));
        assert_eq!(
            get(&format!(
                "causeway_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )),
            1.0
        );
        assert_eq!(
            get(&format!(
                "causeway_site_info{{site=\"a\",interface=\"causeway0\",public_key=\"{}\"}}",
                key(0xaa)
            )),
            1.0
        );
        assert_eq!(get("causeway_packet_threads_alive"), 1.0);
        assert_eq!(get("causeway_gateway_active"), 1.0);
        assert_eq!(get("causeway_peers_configured"), 3.0);
        assert_eq!(
            get(&format!(
                "causeway_peer_info{{peer=\"b\",public_key=\"{}\"}}",
                key(0xbb)
            )),
            1.0
        );
        assert_eq!(get("causeway_peer_tx_bytes_total{peer=\"b\"}"), 1000.0);
        assert_eq!(get("causeway_peer_rx_bytes_total{peer=\"b\"}"), 2000.0);
        assert_eq!(get("causeway_peer_tx_packets_total{peer=\"b\"}"), 10.0);
        assert_eq!(get("causeway_peer_rx_packets_total{peer=\"b\"}"), 20.0);
        assert_eq!(get("causeway_peer_relay_tx_packets_total{peer=\"c\"}"), 7.0);
        assert_eq!(get("causeway_peer_relay_rx_packets_total{peer=\"c\"}"), 8.0);
        assert_eq!(get("causeway_peer_relay_tx_packets_total{peer=\"b\"}"), 0.0);
        assert_eq!(
            get("causeway_peer_last_handshake_timestamp_seconds{peer=\"b\"}"),
            1_700_000_000.5
        );
        let quoted = "d-\\\"quoted\\\"";
        assert_eq!(
            get(&format!(
                "causeway_peer_last_handshake_timestamp_seconds{{peer=\"{quoted}\"}}"
            )),
            0.0
        );
        // Paths: one 1 per peer, every value exported.
        for (peer, current) in [("b", "static"), ("c", "relay"), (quoted, "none")] {
            for path in ["static", "direct", "relay", "none"] {
                assert_eq!(
                    get(&format!(
                        "causeway_peer_path{{peer=\"{peer}\",path=\"{path}\"}}"
                    )),
                    f64::from(u8::from(path == current)),
                    "{peer} {path}"
                );
            }
        }
        // RTT: in seconds, and absent until known.
        assert_eq!(get("causeway_peer_rtt_seconds{peer=\"b\"}"), 0.0015);
        assert_eq!(get("causeway_peer_rtt_seconds{peer=\"c\"}"), 0.04);
        assert!(
            !series.contains_key(&format!("causeway_peer_rtt_seconds{{peer=\"{quoted}\"}}")),
            "{text}"
        );
        assert_eq!(
            get("causeway_peer_drops_total{peer=\"b\",reason=\"spoofed_source\"}"),
            5.0
        );
        assert_eq!(
            get("causeway_peer_drops_total{peer=\"b\",reason=\"policy_port\"}"),
            2.0
        );
        assert_eq!(
            get("causeway_site_drops_total{reason=\"malformed\"}"),
            400.0
        );
        // Every reason, for every peer and the site, zeros included.
        for reason in DropReason::ALL {
            for peer in ["b", "c", quoted] {
                get(&format!(
                    "causeway_peer_drops_total{{peer=\"{peer}\",reason=\"{}\"}}",
                    reason.name()
                ));
            }
            get(&format!(
                "causeway_site_drops_total{{reason=\"{}\"}}",
                reason.name()
            ));
        }
        // The rendezvous client.
        let r = "{rendezvous=\"192.0.2.9:4433\"}";
        for (name, value) in [
            ("connected", 1.0),
            ("connections_total", 4.0),
            ("relay_tx_packets_total", 11.0),
            ("relay_tx_bytes_total", 1100.0),
            ("relay_tx_datagrams_total", 13.0),
            ("relay_rx_packets_total", 12.0),
            ("relay_rx_bytes_total", 1200.0),
            ("relay_incomplete_total", 1.0),
            ("relay_malformed_total", 2.0),
            ("relay_rx_overflow_total", 3.0),
        ] {
            assert_eq!(get(&format!("causeway_rendezvous_client_{name}{r}")), value);
        }
        for (name, kind) in [
            ("causeway_site_info", "gauge"),
            ("causeway_packet_threads_alive", "gauge"),
            ("causeway_peer_rx_bytes_total", "counter"),
            ("causeway_peer_relay_tx_packets_total", "counter"),
            ("causeway_peer_last_handshake_timestamp_seconds", "gauge"),
            ("causeway_peer_path", "gauge"),
            ("causeway_peer_rtt_seconds", "gauge"),
            ("causeway_rendezvous_client_connected", "gauge"),
            (
                "causeway_rendezvous_client_relay_rx_overflow_total",
                "counter",
            ),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} is not a {kind}:\n{text}"
            );
        }
        // Exactly the documented series: the old ones unchanged, and the new.
        assert_eq!(
            names(&series),
            [
                "causeway_build_info",
                "causeway_gateway_active",
                "causeway_packet_threads_alive",
                "causeway_peer_drops_total",
                "causeway_peer_info",
                "causeway_peer_last_handshake_timestamp_seconds",
                "causeway_peer_path",
                "causeway_peer_relay_rx_packets_total",
                "causeway_peer_relay_tx_packets_total",
                "causeway_peer_rtt_seconds",
                "causeway_peer_rx_bytes_total",
                "causeway_peer_rx_packets_total",
                "causeway_peer_tx_bytes_total",
                "causeway_peer_tx_packets_total",
                "causeway_peers_configured",
                "causeway_rendezvous_client_connected",
                "causeway_rendezvous_client_connections_total",
                "causeway_rendezvous_client_over_tcp",
                "causeway_rendezvous_client_relay_incomplete_total",
                "causeway_rendezvous_client_relay_malformed_total",
                "causeway_rendezvous_client_relay_rx_bytes_total",
                "causeway_rendezvous_client_relay_rx_overflow_total",
                "causeway_rendezvous_client_relay_rx_packets_total",
                "causeway_rendezvous_client_relay_tx_bytes_total",
                "causeway_rendezvous_client_relay_tx_datagrams_total",
                "causeway_rendezvous_client_relay_tx_packets_total",
                "causeway_site_drops_total",
                "causeway_site_info",
            ]
        );
        // Every series is listed in the module documentation's table.
        let doc = include_str!("prometheus.rs");
        for name in names(&series) {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is not documented"
            );
        }
        // This process' own series.
        assert!(get("process_cpu_seconds_total") >= 0.0);
        assert!(get("process_resident_memory_bytes") > 1e5);
        assert!(get("process_virtual_memory_bytes") >= get("process_resident_memory_bytes"));
        assert!(get("process_open_fds") >= 3.0);
        assert!(get("process_max_fds") >= get("process_open_fds"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let start = get("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 24.0 * 3600.0,
            "start {start}, now {now}"
        );
    }

    #[test]
    fn no_peers_still_exports_the_site() {
        let text = encode(&registry(|| {
            let mut s = snapshot::example();
            s.peers.clear();
            s.site.rendezvous.clear();
            s.site.packet_threads_alive = false;
            s.site.role = crate::core::Role::Standby;
            s
        }));
        let series = parse(&text);
        assert_eq!(series.get("causeway_peers_configured"), Some(&0.0));
        assert_eq!(series.get("causeway_packet_threads_alive"), Some(&0.0));
        assert_eq!(series.get("causeway_gateway_active"), Some(&0.0));
        assert_eq!(
            series
                .keys()
                .filter(|k| k.starts_with("causeway_site_drops_total"))
                .count(),
            N_REASONS
        );
        assert!(
            !series
                .keys()
                .any(|k| k.starts_with("causeway_peer_")
                    || k.starts_with("causeway_rendezvous_client_")),
            "{text}"
        );
    }

    #[test]
    fn proc_parsers() {
        // A command name with spaces and parentheses.
        let stat = "4242 (cw (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 37 0 0 20 0 4 0 123456 \
                    987654321 2500 18446744073709551615 1 1 0 0 0 0 0 4096 17475 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                cpu_ticks: 187,
                start_ticks: 123456,
                virtual_bytes: 987654321,
                resident_pages: 2500
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_boot_time("cpu 1\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95528                95528                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        assert_eq!(
            parse_max_fds(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
        let own = ProcessSample::read().expect("/proc/self");
        assert!(
            own.resident_bytes > 0 && own.open_fds.is_some() && own.max_fds.is_some(),
            "{own:?}"
        );
    }

    fn rendezvous_sample() -> RendezvousSample {
        let key = |b: u8| x25519_dalek::PublicKey::from([b; 32]);
        RendezvousSample {
            sites: vec![
                SiteStats {
                    name: "a".into(),
                    public_key: key(1),
                    connected: true,
                    over_tcp: true,
                    relay_rx_packets: 30,
                    relay_rx_bytes: 4500,
                    relay_dropped: 2,
                },
                SiteStats {
                    name: "b".into(),
                    public_key: key(2),
                    connected: false,
                    over_tcp: false,
                    relay_rx_packets: 0,
                    relay_rx_bytes: 0,
                    relay_dropped: 0,
                },
            ],
            stun_answered: 17,
            pending_auth: 3,
            abuse: AbuseCounters {
                refused: 5,
                auth_failures: 2,
                ..AbuseCounters::default()
            },
        }
    }

    #[test]
    fn rendezvous_exposition_has_every_series() {
        let text = encode(&rendezvous_registry(rendezvous_sample));
        let series = parse(&text);
        let get = |key: &str| {
            *series
                .get(key)
                .unwrap_or_else(|| panic!("no {key} in\n{text}"))
        };
        assert_eq!(
            get(&format!(
                "causeway_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )),
            1.0
        );
        assert_eq!(get("causeway_rendezvous_sites_configured"), 2.0);
        assert_eq!(get("causeway_rendezvous_site_connected{site=\"a\"}"), 1.0);
        assert_eq!(get("causeway_rendezvous_site_connected{site=\"b\"}"), 0.0);
        assert_eq!(get("causeway_rendezvous_site_over_tcp{site=\"a\"}"), 1.0);
        assert_eq!(get("causeway_rendezvous_site_over_tcp{site=\"b\"}"), 0.0);
        assert_eq!(
            get("causeway_rendezvous_relay_rx_packets_total{site=\"a\"}"),
            30.0
        );
        assert_eq!(
            get("causeway_rendezvous_relay_rx_bytes_total{site=\"a\"}"),
            4500.0
        );
        assert_eq!(
            get("causeway_rendezvous_relay_dropped_total{site=\"a\"}"),
            2.0
        );
        // Sites that never connected are exported too, zeros included.
        assert_eq!(
            get("causeway_rendezvous_relay_rx_packets_total{site=\"b\"}"),
            0.0
        );
        assert_eq!(
            get("causeway_rendezvous_relay_rx_bytes_total{site=\"b\"}"),
            0.0
        );
        assert_eq!(
            get("causeway_rendezvous_relay_dropped_total{site=\"b\"}"),
            0.0
        );
        assert_eq!(get("causeway_rendezvous_stun_answered_total"), 17.0);
        assert_eq!(get("causeway_rendezvous_pending_auth"), 3.0);
        assert_eq!(
            get("causeway_rendezvous_abuse_total{what=\"refused\"}"),
            5.0
        );
        assert_eq!(
            get("causeway_rendezvous_abuse_total{what=\"auth_failures\"}"),
            2.0
        );
        assert_eq!(
            get("causeway_rendezvous_abuse_total{what=\"updates_coalesced\"}"),
            0.0
        );
        assert_eq!(
            get("causeway_rendezvous_abuse_total{what=\"relay_strangers\"}"),
            0.0
        );
        for (name, kind) in [
            ("causeway_rendezvous_sites_configured", "gauge"),
            ("causeway_rendezvous_site_connected", "gauge"),
            ("causeway_rendezvous_relay_rx_packets_total", "counter"),
            ("causeway_rendezvous_relay_rx_bytes_total", "counter"),
            ("causeway_rendezvous_relay_dropped_total", "counter"),
            ("causeway_rendezvous_stun_answered_total", "counter"),
            ("causeway_rendezvous_pending_auth", "gauge"),
            ("causeway_rendezvous_abuse_total", "counter"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} is not a {kind}:\n{text}"
            );
        }
        assert!(get("process_resident_memory_bytes") > 0.0);
        assert!(get("process_open_fds") >= 1.0);
        // Nothing of the site daemon's.
        assert!(
            !series
                .keys()
                .any(|k| k.starts_with("causeway_peer") || k.starts_with("causeway_site_")),
            "{text}"
        );
        // Exactly the documented causeway_ series.
        let names: std::collections::BTreeSet<&str> = series
            .keys()
            .filter(|k| k.starts_with("causeway_"))
            .filter_map(|k| k.split('{').next())
            .collect();
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [
                "causeway_build_info",
                "causeway_rendezvous_abuse_total",
                "causeway_rendezvous_pending_auth",
                "causeway_rendezvous_relay_dropped_total",
                "causeway_rendezvous_relay_rx_bytes_total",
                "causeway_rendezvous_relay_rx_packets_total",
                "causeway_rendezvous_site_connected",
                "causeway_rendezvous_site_over_tcp",
                "causeway_rendezvous_sites_configured",
                "causeway_rendezvous_stun_answered_total",
            ]
        );
    }

    #[test]
    fn rendezvous_without_sites() {
        let text = encode(&rendezvous_registry(|| RendezvousSample {
            sites: vec![],
            stun_answered: 0,
            pending_auth: 0,
            abuse: AbuseCounters::default(),
        }));
        let series = parse(&text);
        assert_eq!(
            series.get("causeway_rendezvous_sites_configured"),
            Some(&0.0)
        );
        assert_eq!(
            series.get("causeway_rendezvous_stun_answered_total"),
            Some(&0.0)
        );
        assert!(!series.keys().any(|k| k.contains("{site=")), "{text}");
    }

    /// A real (running) rendezvous' counters, read through its stats handle.
    #[tokio::test]
    async fn rendezvous_endpoints_read_the_running_server() {
        use causeway_nat::rendezvous::{RendezvousServer, SiteEntry};
        use causeway_nat::stun;
        let sites: Vec<SiteEntry> = ["east", "west"]
            .into_iter()
            .map(|name| SiteEntry {
                name: name.into(),
                public_key: x25519_dalek::PublicKey::from(&keys::generate()),
            })
            .collect();
        let quic = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind quic");
        let stun_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind stun");
        let server =
            RendezvousServer::with_sockets(keys::generate(), &sites, quic, Some(stun_socket));
        let stun_addr = server.stun_addr().expect("stun addr");
        let stats = server.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));

        let ready = Arc::new(AtomicBool::new(false));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = serve_on(
            listener,
            rendezvous_registry(move || RendezvousSample::collect(&stats)),
            Arc::clone(&ready),
            || true,
        )
        .expect("serve");
        assert_eq!(http(addr, &get("/healthz")).await.0, 200);
        assert_eq!(http(addr, &get("/readyz")).await.0, 503);
        ready.store(true, Ordering::Release);
        assert_eq!(http(addr, &get("/readyz")).await.0, 200);

        // One STUN Binding request, answered.
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind client");
        let mut request = [0u8; stun::BINDING_REQUEST_LEN];
        let len = stun::encode_binding_request(&stun::TransactionId([7; 12]), &mut request);
        client
            .send_to(&request[..len], stun_addr)
            .await
            .expect("send STUN");
        let mut answer = [0u8; 512];
        tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut answer))
            .await
            .expect("STUN answer in time")
            .expect("STUN answer");

        let (status, _, body) = http(addr, &get("/metrics")).await;
        assert_eq!(status, 200);
        let series = parse(&body);
        assert_eq!(
            series.get("causeway_rendezvous_sites_configured"),
            Some(&2.0),
            "{body}"
        );
        assert_eq!(
            series.get("causeway_rendezvous_site_connected{site=\"east\"}"),
            Some(&0.0),
            "{body}"
        );
        assert_eq!(
            series.get("causeway_rendezvous_relay_rx_packets_total{site=\"west\"}"),
            Some(&0.0),
            "{body}"
        );
        assert_eq!(
            series.get("causeway_rendezvous_stun_answered_total"),
            Some(&1.0),
            "{body}"
        );

        let _ = stop.send(());
        running.await.expect("join").expect("rendezvous ran");
        drop(metrics);
    }
}
