//! The port mapping driver: asks the default IPv4 gateway, over PCP or
//! NAT-PMP, to map an external UDP port to the WireGuard port, and hands
//! the mapping to the core as a candidate
//! ([`crate::core::Site::set_mapped_candidate`]).
//!
//! The protocol (retries, fallback, renewal) is
//! [`causeway_nat::portmap::PortMapper`]; this task owns its socket (an
//! ephemeral one, connected to `gateway:5351`, so that only the gateway can
//! answer) and its clock. It runs with the rendezvous tasks on the active
//! replica of a site with NAT traversal and `[site] port_mapping`.
//! Answers that do not fit are dropped and counted as `port_mapping`
//! drops; nothing here can stop the daemon.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use causeway_nat::portmap::{self, Event, MapperConfig, PortMapper};
use tokio::net::UdpSocket;
use tracing::{debug, info};

use super::Ctx;
use crate::core::DropReason;

/// How long to wait before looking for a gateway again when there is none
/// (or no socket toward it).
const NO_GATEWAY_RETRY: Duration = Duration::from_secs(60);

/// Runs until aborted (when the rendezvous tasks stop): keeps a mapping of
/// `internal_port` on the default gateway, if it lets us.
pub(crate) async fn run(ctx: Arc<Ctx>, internal_port: u16) {
    // Deletes the mapping (lifetime 0) and withdraws the candidate when
    // the task ends, aborted or not.
    let mut guard = Guard {
        ctx: Arc::clone(&ctx),
        socket: None,
        delete: None,
    };
    loop {
        let Some(gateway) = default_gateway() else {
            debug!("port mapping: no default IPv4 gateway");
            tokio::time::sleep(NO_GATEWAY_RETRY).await;
            continue;
        };
        let socket = match connect(gateway).await {
            Ok(socket) => socket,
            Err(e) => {
                debug!(%gateway, "port mapping: no socket toward the gateway: {e}");
                tokio::time::sleep(NO_GATEWAY_RETRY).await;
                continue;
            }
        };
        guard.socket = Some(socket.std);
        let client = socket.client;
        // The same nonce after a restart: the router still holds our
        // mapping under it.
        let nonce = portmap::site_nonce(&ctx.site.private_key.to_bytes(), internal_port);
        let mut mapper = PortMapper::new(
            MapperConfig::new(internal_port, client),
            nonce,
            Instant::now(),
        );
        // Returns only without a mapping (nothing to withdraw or delete).
        drive(&ctx, &socket.tokio, gateway, &mut mapper, &mut guard).await;
    }
}

/// One gateway: returns when the default gateway is no longer `gateway`.
async fn drive(
    ctx: &Ctx,
    socket: &UdpSocket,
    gateway: Ipv4Addr,
    mapper: &mut PortMapper,
    guard: &mut Guard,
) {
    let mut buf = [0u8; 1100];
    loop {
        while let Some(datagram) = mapper.poll_transmit() {
            if let Err(e) = socket.send(&datagram).await {
                debug!(%gateway, "port mapping request: {e}");
            }
        }
        while let Some(event) = mapper.poll_event() {
            match event {
                Event::Mapped(mapping) => {
                    info!(
                        %gateway,
                        protocol = %mapping.protocol,
                        external = %mapping.external,
                        lifetime_secs = mapping.lifetime.as_secs(),
                        "port mapping of the WireGuard port obtained"
                    );
                    let addr = SocketAddr::V4(mapping.external);
                    ctx.site.set_mapped_candidate(Some(addr), &mut ctx.io());
                    guard.delete = mapper.delete_request();
                }
                Event::Lost => {
                    info!(%gateway, "port mapping lost");
                    ctx.site.set_mapped_candidate(None, &mut ctx.io());
                    guard.delete = None;
                }
                Event::Refused { protocol, result } => {
                    debug!(%gateway, %protocol, result, "port mapping refused");
                }
            }
        }
        let at = tokio::time::Instant::from_std(mapper.poll_timeout());
        tokio::select! {
            () = tokio::time::sleep_until(at) => {
                let unmapped = mapper.mapping().is_none();
                mapper.handle_timeout(Instant::now());
                // Without a mapping, the gateway may have changed meanwhile.
                if unmapped && default_gateway() != Some(gateway) {
                    return;
                }
            }
            received = socket.recv(&mut buf) => match received {
                Ok(n) => {
                    if let Err(e) = mapper.handle_response(Instant::now(), &buf[..n]) {
                        ctx.site.drops.count(DropReason::PortMapping);
                        debug!(%gateway, "port mapping answer dropped: {e}");
                    }
                }
                // ICMP port unreachable and the like: as good as silence.
                Err(e) => debug!(%gateway, "port mapping: {e}"),
            },
        }
    }
}

/// The socket toward the gateway, and our address as it sees us.
struct Connected {
    tokio: UdpSocket,
    /// A clone of the same socket, for the delete on shutdown.
    std: std::net::UdpSocket,
    client: Ipv4Addr,
}

/// An ephemeral IPv4 UDP socket connected to `gateway`'s PCP / NAT-PMP
/// port.
async fn connect(gateway: Ipv4Addr) -> std::io::Result<Connected> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).await?;
    socket
        .connect(SocketAddrV4::new(gateway, portmap::SERVER_PORT))
        .await?;
    let client = match socket.local_addr()?.ip() {
        std::net::IpAddr::V4(ip) => ip,
        // Bound to 0.0.0.0: always IPv4.
        std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let std = socket.into_std()?;
    let clone = std.try_clone()?;
    Ok(Connected {
        tokio: UdpSocket::from_std(std)?,
        std: clone,
        client,
    })
}

/// Deletes the mapping held and withdraws the candidate when dropped.
struct Guard {
    ctx: Arc<Ctx>,
    socket: Option<std::net::UdpSocket>,
    delete: Option<Vec<u8>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let (Some(socket), Some(delete)) = (&self.socket, &self.delete) {
            // Non-blocking, once: a lost delete only leaves the mapping to
            // expire on its own.
            let _ = socket.send(delete);
        }
        self.ctx.site.set_mapped_candidate(None, &mut self.ctx.io());
    }
}

/// The default IPv4 gateway of this network namespace (the lowest-metric
/// default route with a gateway in `/proc/net/route`).
pub(crate) fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_route_table(&table)
}

/// The default gateway in the text of `/proc/net/route`.
fn parse_route_table(table: &str) -> Option<Ipv4Addr> {
    /// RTF_UP | RTF_GATEWAY.
    const UP_GATEWAY: u32 = 0x1 | 0x2;
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        let (Some(dst), Some(gw), Some(flags), Ok(metric), Some(mask)) = (
            hex(fields[1]),
            hex(fields[2]),
            hex(fields[3]),
            fields[6].parse::<u32>(),
            hex(fields[7]),
        ) else {
            continue;
        };
        if dst != 0 || mask != 0 || flags & UP_GATEWAY != UP_GATEWAY {
            continue;
        }
        // The kernel prints the address in host order of its bytes.
        let gateway = Ipv4Addr::from(gw.to_le_bytes());
        if best.is_none_or(|(m, _)| metric < m) {
            best = Some((metric, gateway));
        }
    }
    best.map(|(_, gateway)| gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_is_read_from_proc_net_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            wan0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            wan1\t00000000\t010010AC\t0003\t0\t0\t50\t00000000\t0\t0\t0\n\
            wan0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(parse_route_table(table), Some(Ipv4Addr::new(172, 16, 0, 1)));
        let no_default = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
            wan0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(parse_route_table(no_default), None);
        assert_eq!(parse_route_table("garbage"), None);
    }
}
