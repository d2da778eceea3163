//! Observing the running site: `causeway status` (the control socket),
//! `wg show` (the WireGuard UAPI socket), and Prometheus metrics with the
//! health endpoints.
//!
//! All three show one kind of snapshot (`snapshot::Snapshot`), taken by
//! `snapshot::LiveSite`: the only code that reads the data path's state
//! for them, one lock per peer. Each has a renderer of it:
//! [`Status`] (JSON and text), the Prometheus collector, the UAPI `get=1`
//! text. The control and UAPI sockets are two handlers on one Unix-socket
//! server (`unix.rs`); metrics and health are served over HTTP (`http.rs`).

mod http;
mod prometheus;
mod snapshot;
mod status;
mod uapi;
mod unix;

pub use http::MetricsServer;
pub(crate) use prometheus::serve as serve_metrics;
pub use prometheus::serve_rendezvous;
pub(crate) use snapshot::LiveSite;
pub(crate) use status::serve as serve_control;
pub use status::{PeerStatus, RendezvousStatus, Status, ViewStatus, query, request_role};
#[doc(hidden)]
pub use uapi::fuzz_requests as fuzz_uapi_requests;
pub(crate) use uapi::serve as serve_uapi;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::prometheus::tests::{parse, site_exposition};
    use super::snapshot::example;
    use super::*;
    use crate::keys;

    /// The UAPI answer's peers, each as its `key=value` lines (keys that
    /// repeat, `allowed_ip`, joined with commas).
    fn uapi_peers(text: &str) -> Vec<BTreeMap<String, String>> {
        let mut peers: Vec<BTreeMap<String, String>> = Vec::new();
        for line in text.lines() {
            let (k, v) = line.split_once('=').expect("key=value");
            if k == "public_key" {
                peers.push(BTreeMap::new());
            }
            let Some(peer) = peers.last_mut() else {
                continue;
            };
            peer.entry(k.to_owned())
                .and_modify(|old| {
                    old.push(',');
                    old.push_str(v);
                })
                .or_insert_with(|| v.to_owned());
        }
        peers
    }

    fn base64_of_hex(hex: &str) -> String {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let key: [u8; 32] = bytes.try_into().expect("32 bytes");
        keys::encode_public(&x25519_dalek::PublicKey::from(key))
    }

    /// Status, metrics and `wg show` of one snapshot say the same thing.
    #[test]
    fn the_three_renderers_agree() {
        let snapshot = example();
        let status = Status::of(&snapshot);
        let metrics = parse(&site_exposition());
        let uapi_text = uapi::encode(&snapshot, &[7; 32]);
        let uapi = uapi_peers(&uapi_text);
        let metric = |name: &str, labels: &str| {
            *metrics
                .get(&format!("{name}{{{labels}}}"))
                .unwrap_or_else(|| panic!("no {name}{{{labels}}}"))
        };

        assert!(uapi_text.contains(&format!("\nlisten_port={}\n", status.listen_port)));
        assert_eq!(
            metric(
                "causeway_site_info",
                &format!(
                    "site=\"{}\",interface=\"{}\",public_key=\"{}\"",
                    status.site, status.interface, status.public_key
                )
            ),
            1.0
        );
        assert_eq!(
            metrics.get("causeway_packet_threads_alive"),
            Some(&f64::from(u8::from(status.packet_threads_alive)))
        );
        for (reason, n) in &status.drops {
            assert_eq!(
                metric("causeway_site_drops_total", &format!("reason=\"{reason}\"")),
                *n as f64
            );
        }
        for r in &status.rendezvous {
            let labels = format!("rendezvous=\"{}\"", r.server);
            let m = |name: &str| metric(&format!("causeway_rendezvous_client_{name}"), &labels);
            assert_eq!(m("connected"), f64::from(u8::from(r.connected)));
            assert_eq!(m("connections_total"), r.connections as f64);
            assert_eq!(m("relay_tx_packets_total"), r.relay_tx_packets as f64);
            assert_eq!(m("relay_tx_bytes_total"), r.relay_tx_bytes as f64);
            assert_eq!(m("relay_tx_datagrams_total"), r.relay_tx_datagrams as f64);
            assert_eq!(m("relay_rx_packets_total"), r.relay_rx_packets as f64);
            assert_eq!(m("relay_rx_bytes_total"), r.relay_rx_bytes as f64);
            assert_eq!(m("relay_incomplete_total"), r.relay_incomplete as f64);
            assert_eq!(m("relay_malformed_total"), r.relay_malformed as f64);
            assert_eq!(m("relay_rx_overflow_total"), r.relay_rx_overflow as f64);
        }

        assert_eq!(status.peers.len(), uapi.len());
        assert_eq!(
            metrics.get("causeway_peers_configured"),
            Some(&(status.peers.len() as f64))
        );
        for (p, w) in status.peers.iter().zip(&uapi) {
            let name = p.name.replace('"', "\\\"");
            let peer = format!("peer=\"{name}\"");
            // Identity.
            assert_eq!(base64_of_hex(&w["public_key"]), p.public_key);
            assert_eq!(
                metric(
                    "causeway_peer_info",
                    &format!("{peer},public_key=\"{}\"", p.public_key)
                ),
                1.0
            );
            // Where packets go.
            assert_eq!(w.get("endpoint"), p.endpoint.as_ref(), "{name}");
            assert_eq!(
                metric("causeway_peer_path", &format!("{peer},path=\"{}\"", p.path)),
                1.0
            );
            let rtt = metrics.get(&format!("causeway_peer_rtt_seconds{{{peer}}}"));
            assert_eq!(rtt.copied(), p.rtt_ms.map(|ms| ms / 1e3), "{name}");
            // Views: the UAPI's allowed IPs.
            let views: Vec<&str> = p.views.iter().map(|v| v.view.as_str()).collect();
            assert_eq!(
                w.get("allowed_ip").map(String::as_str).unwrap_or(""),
                views.join(","),
                "{name}"
            );
            // Handshake: one instant, three spellings.
            let wall = w["last_handshake_time_sec"].parse::<f64>().expect("sec")
                + w["last_handshake_time_nsec"].parse::<f64>().expect("nsec") / 1e9;
            let unix = p.last_handshake_unix.unwrap_or(0.0);
            assert_eq!(wall, unix, "{name}");
            assert_eq!(
                metric("causeway_peer_last_handshake_timestamp_seconds", &peer),
                unix
            );
            assert_eq!(
                w["persistent_keepalive_interval"],
                p.persistent_keepalive_secs.unwrap_or(0).to_string()
            );
            // Counters.
            assert_eq!(w["tx_bytes"], p.tx_bytes.to_string());
            assert_eq!(w["rx_bytes"], p.rx_bytes.to_string());
            for (series, value) in [
                ("causeway_peer_tx_bytes_total", p.tx_bytes),
                ("causeway_peer_rx_bytes_total", p.rx_bytes),
                ("causeway_peer_tx_packets_total", p.tx_packets),
                ("causeway_peer_rx_packets_total", p.rx_packets),
                ("causeway_peer_relay_tx_packets_total", p.relay_tx_packets),
                ("causeway_peer_relay_rx_packets_total", p.relay_rx_packets),
            ] {
                assert_eq!(metric(series, &peer), value as f64, "{series} {name}");
            }
            for reason in crate::core::DropReason::ALL {
                let n = p.drops.get(reason.name()).copied().unwrap_or(0);
                assert_eq!(
                    metric(
                        "causeway_peer_drops_total",
                        &format!("{peer},reason=\"{}\"", reason.name())
                    ),
                    n as f64
                );
            }
        }
    }
}
