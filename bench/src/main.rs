//! `causeway-bench`: Causeway's benchmark.
//!
//! - `server` / `client`: an iperf-style pair that measures any path, a
//!   deployed tunnel included (TCP throughput over 1 or N streams, UDP
//!   throughput, loss and jitter at a given rate, request/response latency
//!   idle and under load). A control connection negotiates each test, and
//!   everything uses one port (TCP and UDP).
//! - `lab`: builds two-site topologies in network namespaces on this machine
//!   and measures Causeway side by side with the raw path, wireguard-go and
//!   boringtun-cli, interleaved run by run; writes a Markdown table, a JSON
//!   file and an SVG chart.
//! - `demo`: joins two sites with the real daemon and shows traffic crossing.
//! - `abuse`: attacks a live rendezvous in a lab while a legitimate pair of
//!   sites registers and relays; reports the rendezvous' memory and CPU and
//!   the pair's times.
//! - `failover`: takes the active gateway replica of a cluster site out
//!   (keepalived, two replicas) under a 20 ms ping train and reports the
//!   longest gap, run after run in fresh labs.
//! - `mesh`: N sites, every one peering with every other through one
//!   rendezvous (public, port-preserving and symmetric NATs); reports the
//!   time to full reachability, direct and relayed pairs, and each
//!   daemon's and the rendezvous' memory, idle CPU and idle traffic.
//! - `wide`: one gateway with many peers (one real, the others simulated
//!   by `wide-sim`); reports handshake times, memory, throughput against
//!   the 1-peer case and what a reload disturbs.
//! - `rendezvous`: one rendezvous under thousands of sites from one load
//!   generator (registration, churn, relay); reports the time from a
//!   `register` to the peers' `peer_update`, memory per site, CPU and the
//!   relay's throughput and fairness.
//! - `threads`: the data path's per-packet crypto (boringtun encapsulate
//!   and decapsulate) on 1, 2, … threads, a peer per thread or one peer
//!   for all; reports Gbit/s per thread count (issue 13, "many cores").

mod abuse;
mod client;
mod demo;
mod failover;
mod interrupt;
mod lab;
mod mesh;
mod proto;
mod rendezvous;
mod server;
mod stats;
mod threads;
mod udp;
mod wide;

use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Parser, Subcommand};

use proto::{DEFAULT_PORT, Kind};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attack a live rendezvous in a lab (thousands of unauthenticated
    /// connections, maximal pre-authentication frames and datagrams,
    /// replayed hellos, a registration flood from a valid site) while a
    /// legitimate pair of `causeway up` daemons behind symmetric NATs
    /// registers and relays. Reports the rendezvous' peak RSS and CPU
    /// seconds and the pair's time to registration and to its first
    /// relayed packet. Needs root; tears the lab down.
    Abuse {
        /// The `causeway` binary (default: next to this one).
        #[arg(long)]
        causeway: Option<PathBuf>,
        /// Connection attempts of all strangers together.
        #[arg(long, default_value_t = 2000)]
        connections: u32,
        /// Stranger sites, each with its own address (1 to 16).
        #[arg(long, default_value_t = 4)]
        strangers: u32,
        /// How long the attack lasts, in seconds (at most 120).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One attacker of `abuse` (started by it in an attacker's namespace).
    #[command(hide = true)]
    AbuseWorker {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        connections: u32,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        site_key_file: Option<PathBuf>,
        #[arg(long)]
        rendezvous_key: Option<String>,
        #[arg(long, value_delimiter = ',')]
        peers: Vec<String>,
    },
    /// Join two sites in a local lab and show traffic crossing (needs root).
    Demo {
        /// The causeway binary [default: next to this one].
        #[arg(long)]
        causeway: Option<PathBuf>,
        /// Seconds of TCP throughput measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        /// The NAT routers in front of both sites: `port-preserving`
        /// (masquerade: holes can be punched) or `symmetric`
        /// (random,fully-random: everything goes through the relay).
        #[arg(long, value_enum, default_value_t = demo::DemoNat::PortPreserving)]
        nat: demo::DemoNat,
    },
    /// Take the active gateway replica of a cluster site out (kill -9 of
    /// its daemon, or its node's links cut) under a 20 ms ping train and
    /// report the longest gap, the time to the first reply and to the
    /// standby's takeover, and the fail-back's gap; median (min–max) over
    /// fresh labs. Two replicas under keepalived (VRRP, 100 ms adverts),
    /// through NATs and a rendezvous, or with static endpoints. Needs
    /// root and keepalived; tears every lab down.
    Failover {
        /// The causeway binary [default: next to this one].
        #[arg(long)]
        causeway: Option<PathBuf>,
        /// Runs per cell (median and min–max are reported).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// How the sites find each other.
        #[arg(long, value_enum, default_value_t = failover::PathsArg::Both)]
        paths: failover::PathsArg,
        /// How the active replica is taken out.
        #[arg(long, value_enum, default_value_t = failover::FailureArg::Both)]
        failure: failover::FailureArg,
        /// Seconds the ping train goes on after the failure (longer, up to
        /// 20 s, until a reply comes).
        #[arg(long, default_value_t = 3.0)]
        after: f64,
        /// Keep every run's logs (daemons, keepalived, rendezvous) in
        /// /tmp, not only those of runs with a gap over 500 ms or that failed.
        #[arg(long)]
        keep_logs: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build a full mesh of N sites (a quarter public, half behind
    /// port-preserving NATs, a quarter behind symmetric NATs; distinct pod
    /// CIDRs 10.i.0.0/16) joined through one rendezvous, start every
    /// daemon at once and report the time until every ordered pair of pods
    /// answers a ping, direct and relayed pairs, and each daemon's and the
    /// rendezvous' RSS, idle CPU and idle underlay traffic. Needs root;
    /// tears every lab down.
    Mesh {
        /// The causeway binary [default: next to this one].
        #[arg(long)]
        causeway: Option<PathBuf>,
        /// Comma-separated mesh sizes (2 to 64 sites).
        #[arg(long, value_delimiter = ',', default_value = "5,10,20")]
        sites: Vec<usize>,
        /// Runs per size, each in a fresh lab (median and min–max are reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Seconds of the idle window (CPU and traffic).
        #[arg(long, default_value_t = 10.0)]
        idle: f64,
        /// Keep every run's logs in /tmp, not only those of failed runs.
        #[arg(long)]
        keep_logs: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One gateway with N peers: peer #0 a second real site, the others
    /// simulated WireGuard peers (one process, a boringtun session and a
    /// UDP socket each, static endpoints). Reports the time to every
    /// handshake (peers initiating at once, and the daemon initiating),
    /// traffic to every peer, the daemon's RSS, what a reload of one peer
    /// disturbs under a 20 ms ping train, and single-stream TCP to peer #0
    /// against a 1-peer daemon, taking turns in the same lab. Needs root and iperf3;
    /// tears every lab down.
    Wide {
        /// The causeway binary [default: next to this one].
        #[arg(long)]
        causeway: Option<PathBuf>,
        /// Comma-separated numbers of peers (1 to 257), interleaved run by run.
        #[arg(long, value_delimiter = ',', default_value = "1,50,100,200")]
        peers: Vec<usize>,
        /// Rounds (each measures every number of peers in a fresh lab).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Seconds of each iperf3 test.
        #[arg(long, default_value_t = 4.0)]
        seconds: f64,
        /// iperf3 runs per lab with the N-peer daemon, each followed by
        /// one with a 1-peer daemon.
        #[arg(long, default_value_t = 3)]
        pairs: u32,
        /// Keep every run's logs in /tmp, not only those of failed runs.
        #[arg(long)]
        keep_logs: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load one `causeway rendezvous` (pinned to CPU 0) with thousands of
    /// sites from one load generator (CPU 1) holding a real, authenticated
    /// QUIC connection per site: register every site with 3 to 10 mutual
    /// peers, stay idle, churn (a share of the sites reconnect or change
    /// candidates every second), then relay between pairs of peers.
    /// Reports register→peer_update latency, RSS per site, CPU per phase
    /// and relay throughput and fairness. Needs root; tears the lab down.
    Rendezvous {
        /// The causeway binary [default: next to this one].
        #[arg(long)]
        causeway: Option<PathBuf>,
        /// Comma-separated numbers of sites, each in a fresh lab.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
        sites: Vec<usize>,
        /// Seconds of the idle window (every site registered).
        #[arg(long, default_value_t = 10.0)]
        idle: f64,
        /// Seconds of churn.
        #[arg(long, default_value_t = 20.0)]
        churn: f64,
        /// Sites that reconnect or change candidates each second, % of all
        /// (half each).
        #[arg(long, default_value_t = 1.0)]
        churn_percent: f64,
        /// Pairs of mutual peers relaying at once.
        #[arg(long, default_value_t = 100)]
        relay_pairs: usize,
        /// Seconds of relaying.
        #[arg(long, default_value_t = 5.0)]
        relay_seconds: f64,
        /// Bytes of each relayed packet.
        #[arg(long, default_value_t = 1200)]
        payload: usize,
        /// Seed of the peer graph and the churn.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Keep the logs (generator, rendezvous) in /tmp, not only those of failed runs.
        #[arg(long)]
        keep_logs: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The data path's per-packet crypto on several threads, without system
    /// calls: boringtun encapsulate and decapsulate of MTU-size packets
    /// with keys from a real handshake, a peer per thread (per-peer
    /// sharding) or one peer behind a mutex for all threads. Reports
    /// Gbit/s per thread count, median (min–max) over interleaved runs,
    /// and the ratio to one thread in the same run.
    Threads {
        /// Comma-separated thread counts.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        threads: Vec<usize>,
        /// Runs (each measures every thread count).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Bytes of each inner IPv4 packet (1420: a full segment at the tunnel MTU).
        #[arg(long, default_value_t = 1420)]
        len: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The simulated peers of `wide` (started by it in a lab namespace).
    #[command(hide = true)]
    WideSim {
        #[arg(long)]
        config: PathBuf,
    },
    /// The load generator of `rendezvous` (started by it in a lab namespace).
    #[command(hide = true)]
    RendezvousWorker {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        rendezvous_key: String,
        #[arg(long)]
        keys: PathBuf,
        #[arg(long, value_delimiter = ',')]
        sources: Vec<IpAddr>,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        idle: f64,
        #[arg(long)]
        churn: f64,
        #[arg(long)]
        churn_percent: f64,
        #[arg(long)]
        relay_pairs: usize,
        #[arg(long)]
        relay_seconds: f64,
        #[arg(long)]
        payload: usize,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Answer `causeway-bench client` tests (TCP and UDP on one port).
    Server {
        /// Address to listen on ([::] also accepts IPv4).
        #[arg(long, default_value_t = IpAddr::V6(Ipv6Addr::UNSPECIFIED))]
        bind: IpAddr,
        /// Port, for TCP and UDP.
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
    },
    /// Run one test against a `causeway-bench server`.
    #[command(group(ArgGroup::new("kind").args(["tcp", "udp", "rr"])))]
    Client {
        /// The server: an address (`10.1.1.2`, `fd00::2`), `address:port`, or `host:port`.
        server: String,
        /// Server port when `server` has none.
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
        /// TCP throughput, client → server (the default).
        #[arg(long)]
        tcp: bool,
        /// UDP throughput, loss and jitter at `--bitrate`.
        #[arg(long)]
        udp: bool,
        /// Request/response latency of `--len`-byte messages (p50/p99/p99.9).
        #[arg(long)]
        rr: bool,
        /// Parallel TCP streams (with --tcp).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=128))]
        streams: u32,
        /// Bulk TCP streams that load the path while round trips are measured (with --rr).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=128))]
        load_streams: u32,
        /// Seconds to send.
        #[arg(long = "time", short = 't', default_value_t = 10.0)]
        time: f64,
        /// UDP payload rate, e.g. 1G, 500M, 100k; 0 sends as fast as possible.
        #[arg(long, short = 'b', default_value = "1G", value_parser = proto::parse_bitrate)]
        bitrate: u64,
        /// UDP datagram payload or round-trip message size, bytes [default: 1372 for UDP, 64 for --rr].
        #[arg(long, short = 'l')]
        len: Option<u32>,
        /// Print a JSON report instead of text.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for each connection to the server.
        #[arg(long, default_value_t = 5.0)]
        connect_timeout: f64,
    },
    /// Write report.md, report.svg (and --doc) again from a lab's report.json.
    Report {
        /// The report.json of a lab run.
        json: PathBuf,
        /// Where to write [default: next to the JSON file].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write the page with the method (e.g. docs/performance.md).
        #[arg(long)]
        doc: Option<PathBuf>,
    },
    /// Measure Causeway against raw, wireguard-go and boringtun-cli in local labs (needs root).
    Lab {
        /// Comma-separated scenarios: lan, delay<ms>, loss<percent>, or parts joined by + (delay50+loss1).
        #[arg(long, value_delimiter = ',', default_value = lab::DEFAULT_SCENARIOS)]
        scenario: Vec<String>,
        /// Comma-separated systems [default: all; causeway-baseline only with --baseline]: raw, causeway, causeway-baseline, causeway-remap, causeway-nat, causeway-relay, causeway-relay-quic, causeway-tcp, wireguard-go, boringtun-cli.
        #[arg(long, value_delimiter = ',')]
        systems: Option<Vec<String>>,
        /// Runs per cell (median and min–max are reported).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Seconds per test.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Where report.md, report.json and report.svg go.
        #[arg(long, default_value = "bench-report")]
        out: PathBuf,
        /// Also write the report with its method as this Markdown page (e.g. docs/performance.md).
        #[arg(long)]
        doc: Option<PathBuf>,
        /// The causeway binary [default: next to this one].
        #[arg(long)]
        causeway: Option<PathBuf>,
        /// Another causeway binary, measured side by side as the system
        /// causeway-baseline (e.g. the last release, for a before/after).
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// The boringtun-cli binary [default: on PATH or in ~/.cargo/bin].
        #[arg(long)]
        boringtun: Option<PathBuf>,
        /// UDP offered rate in the lab.
        #[arg(long, default_value = "1G", value_parser = proto::parse_bitrate)]
        udp_bitrate: u64,
        /// Restrict the tunnel processes (every thread) to these CPUs once
        /// they are up, e.g. `0` to see the tunnel on one core.
        #[arg(long, value_delimiter = ',')]
        tunnel_cpus: Option<Vec<usize>>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Abuse {
            causeway,
            connections,
            strangers,
            seconds,
            json,
        } => abuse::run(abuse::Args {
            causeway,
            connections,
            strangers,
            seconds,
            json,
        }),
        Command::AbuseWorker {
            target,
            connections,
            seconds,
            site_key_file,
            rendezvous_key,
            peers,
        } => abuse::worker(abuse::WorkerArgs {
            target,
            connections,
            seconds,
            site_key_file,
            rendezvous_key,
            peers,
        }),
        Command::Demo {
            causeway,
            seconds,
            nat,
        } => demo::run(causeway, seconds, nat),
        Command::Failover {
            causeway,
            runs,
            paths,
            failure,
            after,
            keep_logs,
            json,
        } => failover::run(failover::Args {
            causeway,
            runs,
            paths,
            failure,
            after,
            keep_logs,
            json,
        }),
        Command::Mesh {
            causeway,
            sites,
            runs,
            idle,
            keep_logs,
            json,
        } => mesh::run(mesh::Args {
            causeway,
            sites,
            runs,
            idle,
            keep_logs,
            json,
        }),
        Command::Wide {
            causeway,
            peers,
            runs,
            seconds,
            pairs,
            keep_logs,
            json,
        } => wide::run(wide::Args {
            causeway,
            peers,
            runs,
            seconds,
            pairs,
            keep_logs,
            json,
        }),
        Command::WideSim { config } => wide::worker(&config),
        Command::Threads {
            threads,
            runs,
            seconds,
            len,
            json,
        } => threads::run(threads::Args {
            threads,
            runs,
            seconds,
            len,
            json,
        }),
        Command::Rendezvous {
            causeway,
            sites,
            idle,
            churn,
            churn_percent,
            relay_pairs,
            relay_seconds,
            payload,
            seed,
            keep_logs,
            json,
        } => rendezvous::run(rendezvous::Args {
            causeway,
            sites,
            idle,
            churn,
            churn_percent,
            relay_pairs,
            relay_seconds,
            payload,
            seed,
            keep_logs,
            json,
        }),
        Command::RendezvousWorker {
            target,
            rendezvous_key,
            keys,
            sources,
            seed,
            idle,
            churn,
            churn_percent,
            relay_pairs,
            relay_seconds,
            payload,
            cpu,
        } => rendezvous::worker(rendezvous::WorkerArgs {
            target,
            rendezvous_key,
            keys,
            sources,
            seed,
            idle,
            churn,
            churn_percent,
            relay_pairs,
            relay_seconds,
            payload,
            cpu,
        }),
        Command::Server { bind, port } => server::run(SocketAddr::new(bind, port)),
        Command::Report { json, out, doc } => lab::rerender(&json, out, doc),
        Command::Client {
            server,
            port,
            tcp: _,
            udp,
            rr,
            streams,
            load_streams,
            time,
            bitrate,
            len,
            json,
            connect_timeout,
        } => {
            let kind = if udp {
                Kind::Udp
            } else if rr {
                Kind::Rr
            } else {
                Kind::Tcp
            };
            client_main(
                &server,
                port,
                kind,
                streams,
                load_streams,
                time,
                bitrate,
                len,
                json,
                connect_timeout,
            )
        }
        Command::Lab {
            scenario,
            systems,
            runs,
            seconds,
            out,
            doc,
            causeway,
            baseline,
            boringtun,
            udp_bitrate,
            tunnel_cpus,
        } => lab::run(lab::Args {
            scenarios: scenario,
            systems,
            runs,
            seconds,
            out,
            doc,
            causeway,
            baseline,
            boringtun,
            udp_bitrate,
            tunnel_cpus,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("causeway-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn client_main(
    server: &str,
    port: u16,
    kind: Kind,
    streams: u32,
    load_streams: u32,
    time: f64,
    bitrate: u64,
    len: Option<u32>,
    json: bool,
    connect_timeout: f64,
) -> anyhow::Result<()> {
    let server = resolve(server, port)?;
    anyhow::ensure!(
        connect_timeout > 0.0 && connect_timeout.is_finite(),
        "--connect-timeout must be positive"
    );
    let opts = client::Options {
        server,
        kind,
        streams,
        load_streams,
        seconds: time,
        bitrate,
        len: len.unwrap_or(if kind == Kind::Rr { 64 } else { lab::UDP_LEN }),
        connect_timeout: Duration::from_secs_f64(connect_timeout),
        progress: !json,
    };
    let report = client::run(&opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", client::summary(&report));
    }
    Ok(())
}

/// `10.1.1.2`, `10.1.1.2:5211`, `[fd00::2]:5211`, `fd00::2`, `host:port`.
fn resolve(server: &str, port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = server.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = server.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let with_port = if server.contains(':') {
        server.to_owned()
    } else {
        format!("{server}:{port}")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("{server} has no address"))
}
