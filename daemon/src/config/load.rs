//! [`load`]: from the file to a [`Config`] the daemon can run on: parsed,
//! the private key read (or created), every host name resolved and every
//! peer CIDR given its view.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use causeway_common::problems::Problems;

use super::{
    Config, ConfigErrors, Endpoint, EndpointSpec, Parsed, PeerConfig, PrivateKey, RendezvousConfig,
    SiteConfig, Stage, parse,
};
use crate::keys::{self, StaticSecret};
use crate::packet::View;
use crate::views::{self, PeerCidrs, Persisted};

/// Reads and parses the file at `path`, then loads the private key (creating
/// the key file if it is missing), resolves endpoint host names and gives
/// every peer CIDR its view: the views recorded in
/// `<state_dir>/views.json` are kept while still valid, new ones are
/// allocated from `remap_pool`, and the file is rewritten (atomically) when
/// anything changed and the whole configuration is valid. Every problem of
/// any stage is reported, at once.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::one(&origin, format!("cannot read the config file: {e}")))?;
    let parsed = parse(&text, &origin)?;
    let mut p = Problems::new(&origin);
    let private_key = private_key(&mut p, &parsed);
    let mut config = resolved(&mut p, parsed, private_key);

    let state_file = config.site.state_dir.join(views::STATE_FILE);
    let mut changed = None;
    match Persisted::load(&state_file) {
        Err(e) => p.add("site.state_dir", e),
        Ok(persisted) => match assign_views(&config, &persisted) {
            Ok((views, next)) => {
                for (peer, views) in config.peers.iter_mut().zip(views) {
                    log_view_changes(peer, &views, &persisted);
                    peer.views = views;
                }
                if next != persisted {
                    changed = Some(next);
                }
            }
            Err(errors) => {
                for e in errors {
                    let name = config.peers.get(e.peer).map_or("", |peer| &peer.name);
                    p.add(format!("peer[{}] {name:?}: cidrs[{}]", e.peer, e.cidr), e);
                }
            }
        },
    }

    p.finish()?;
    // Only a configuration that is valid as a whole changes the state.
    if let Some(next) = changed {
        next.save(&state_file)
            .map_err(|e| ConfigErrors::one(&origin, format!("site.state_dir: {e}")))?;
    }
    Ok(config)
}

/// The site's private key, read from `private_key_file` or created there;
/// no peer may have its public key.
///
/// On a problem, the key returned is a placeholder: the problem makes
/// [`load`] fail, so it is never used.
fn private_key(p: &mut Problems<'_>, config: &Config<Parsed>) -> PrivateKey {
    let file = &config.site.private_key_file;
    match keys::load_or_create_private_key(file) {
        Ok(key) => {
            let key = PrivateKey::from(key);
            let own = key.public_key();
            for (i, peer) in config.peers.iter().enumerate() {
                if peer.public_key == own {
                    p.add(
                        format!("peer[{i}] {:?}: public_key", peer.name),
                        format!(
                            "is this site's own public key (from {}); use the peer's key, or remove this peer",
                            file.display()
                        ),
                    );
                }
            }
            key
        }
        Err(e) => {
            p.add("site.private_key_file", e);
            PrivateKey::from(StaticSecret::from([0; 32]))
        }
    }
}

/// `config` with `private_key` and every endpoint resolved (host names
/// once, here; IP literals were parsed already), in file order: peers,
/// rendezvous, then `site.stun_servers`. Views are left empty for
/// [`load`] to give.
///
/// Every field is named (no `..`), so that a setting added to the config
/// does not compile until it is carried over here. An endpoint that cannot
/// be resolved is recorded as a problem and gets a placeholder address,
/// never used since the problem makes [`load`] fail.
fn resolved(p: &mut Problems<'_>, config: Config<Parsed>, private_key: PrivateKey) -> Config {
    let mut resolve = |field: String, endpoint: EndpointSpec| {
        let addr = endpoint.resolve().unwrap_or_else(|e| {
            p.add(
                field,
                format!(
                    "cannot resolve host {:?}: {e}; check the name and DNS, or write an IP address",
                    endpoint.host()
                ),
            );
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        });
        Endpoint {
            spec: endpoint.spec,
            addr,
        }
    };
    let Config {
        site,
        peers,
        rendezvous,
        cluster,
        failover,
    } = config;
    let peers = peers
        .into_iter()
        .enumerate()
        .map(|(i, peer)| {
            let PeerConfig {
                name,
                public_key,
                cidrs,
                views: (),
                allow,
                endpoint,
                persistent_keepalive,
            } = peer;
            let endpoint = endpoint.map(|e| resolve(format!("peer[{i}] {name:?}: endpoint"), e));
            PeerConfig {
                name,
                public_key,
                cidrs,
                views: Vec::new(),
                allow,
                endpoint,
                persistent_keepalive,
            }
        })
        .collect();
    let rendezvous = rendezvous
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let RendezvousConfig {
                address,
                public_key,
                stun,
                tcp,
            } = r;
            RendezvousConfig {
                address: resolve(format!("rendezvous[{i}]: address"), address),
                public_key,
                stun: resolve(format!("rendezvous[{i}]: stun"), stun),
                tcp: tcp.map(|tcp| resolve(format!("rendezvous[{i}]: tcp"), tcp)),
            }
        })
        .collect();
    let SiteConfig {
        name,
        private_key_file,
        private_key: (),
        interface,
        listen_port,
        pod_cidrs,
        remap_pool,
        reserved_cidrs,
        state_dir,
        mtu,
        control_socket,
        uapi_socket,
        advertise_endpoints,
        stun_servers,
        port_mapping,
        metrics_listen,
    } = site;
    let stun_servers = stun_servers
        .into_iter()
        .enumerate()
        .map(|(i, e)| resolve(format!("site.stun_servers[{i}]"), e))
        .collect();
    let site = SiteConfig {
        name,
        private_key_file,
        private_key,
        interface,
        listen_port,
        pod_cidrs,
        remap_pool,
        reserved_cidrs,
        state_dir,
        mtu,
        control_socket,
        uapi_socket,
        advertise_endpoints,
        stun_servers,
        port_mapping,
        metrics_listen,
    };
    if let Some(cluster) = &cluster {
        super::cluster::check_secret(p, cluster);
    }
    Config {
        site,
        peers,
        rendezvous,
        cluster,
        failover,
    }
}

/// Logs the views that were not recorded yet, and louder, those that differ
/// from the recorded ones (a recorded view that became invalid).
fn log_view_changes(peer: &PeerConfig, views: &[View], persisted: &Persisted) {
    let public_key = keys::encode_public(&peer.public_key);
    for view in views {
        let recorded = persisted
            .views
            .iter()
            .find(|e| e.public_key == public_key && e.real == *view.real());
        match recorded {
            Some(e) if e.view != *view.view() => tracing::warn!(
                peer = peer.name,
                real = %view.real(),
                old_view = %e.view,
                view = %view.view(),
                "the recorded view CIDR is no longer usable (it collides with a local, reserved or other view CIDR, or left remap_pool); the peer is now seen elsewhere"
            ),
            None if view.is_remapped() => tracing::info!(
                peer = peer.name,
                real = %view.real(),
                view = %view.view(),
                "allocated a view CIDR"
            ),
            _ => {}
        }
    }
}

/// The views of every peer CIDR given the recorded ones (see [`views::assign`]).
pub(crate) fn assign_views<S: Stage>(
    config: &Config<S>,
    persisted: &Persisted,
) -> Result<(Vec<Vec<View>>, Persisted), Vec<views::AssignError>> {
    let public_keys: Vec<String> = config
        .peers
        .iter()
        .map(|peer| keys::encode_public(&peer.public_key))
        .collect();
    let peers: Vec<PeerCidrs<'_>> = config
        .peers
        .iter()
        .zip(&public_keys)
        .map(|(peer, public_key)| PeerCidrs {
            name: &peer.name,
            public_key,
            cidrs: &peer.cidrs,
        })
        .collect();
    let site = &config.site;
    views::assign(
        &site.pod_cidrs,
        &site.reserved_cidrs,
        &site.remap_pool,
        &peers,
        persisted,
    )
}
