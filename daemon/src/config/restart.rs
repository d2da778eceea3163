//! Which changes of the configuration a running daemon can take on reload,
//! and which need a restart.

use super::{Config, SiteConfig};

/// The first setting that differs between the running configuration `old`
/// and `new` and that only a restart can apply (it is built into sockets,
/// the interface or the data path's site state), named as the operator
/// writes it; `None` if a reload can apply `new`.
///
/// Every setting is named below, none hidden behind `..`: a setting added
/// to [`SiteConfig`] or [`Config`] does not compile until it is sorted
/// into "needs a restart" or "reloadable".
pub fn needs_restart(old: &Config, new: &Config) -> Option<&'static str> {
    let Config {
        site,
        // Reloadable: the peer table is rebuilt, unchanged peers kept.
        peers: _,
        rendezvous,
        cluster,
        failover,
    } = old;
    let SiteConfig {
        name,
        // Reloadable: what matters is the key, compared below.
        private_key_file: _,
        private_key,
        interface,
        listen_port,
        pod_cidrs,
        // Reloadable: these only decide views, which are per peer.
        remap_pool: _,
        reserved_cidrs: _,
        state_dir: _,
        mtu,
        control_socket,
        uapi_socket,
        advertise_endpoints,
        stun_servers,
        port_mapping,
        metrics_listen,
    } = site;
    let b = &new.site;
    [
        ("[site] name", *name != b.name),
        (
            "the private key",
            private_key.public_key() != b.private_key.public_key(),
        ),
        ("[site] interface", *interface != b.interface),
        ("[site] listen_port", *listen_port != b.listen_port),
        ("[site] pod_cidrs", *pod_cidrs != b.pod_cidrs),
        ("[site] mtu", *mtu != b.mtu),
        ("[site] control_socket", *control_socket != b.control_socket),
        ("[site] uapi_socket", *uapi_socket != b.uapi_socket),
        ("[site] metrics_listen", *metrics_listen != b.metrics_listen),
        (
            "[site] advertise_endpoints",
            *advertise_endpoints != b.advertise_endpoints,
        ),
        ("[site] stun_servers", *stun_servers != b.stun_servers),
        ("[site] port_mapping", *port_mapping != b.port_mapping),
        ("[[rendezvous]]", *rendezvous != new.rendezvous),
        ("[cluster]", *cluster != new.cluster),
        ("[failover]", *failover != new.failover),
    ]
    .into_iter()
    .find_map(|(field, differs)| differs.then_some(field))
}
